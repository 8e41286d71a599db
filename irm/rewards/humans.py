"""Any reward model against humans: the VADER authors' human-rated gold standard (:mod:`irm.data.human`).

On each corpus's held-out split (``test`` by default) an RM scores every text, and its scores are compared
with the texts' mean human ratings:

- **pairwise accuracy**: over every pair of texts whose mean ratings differ by at least ``margin``, the
  share the RM orders as the humans do (a tie in the RM counts one half);
- **Pearson r** and **Kendall tau-b** of scores and mean ratings;

each with a 95% percentile-bootstrap CI over texts (the same resamples for every metric and every RM of a
call, so CIs are paired). A resample is a multiset of texts, so each pair metric is a quadratic form in
the texts' multiplicities over the n x n pair matrices: all resamples cost a few matrix products.

The anchor: VADER's own analyzer (:class:`VaderAnalyzerRM`, ``vaderSentiment``'s compound score) reaches
Pearson r = 0.881 with the tweets' means in the paper; read right, the data gives 0.872 with
vaderSentiment 3.3.2 on all 4,200 tweets.

>>> from irm.rewards import load_rm
>>> res = evaluate_rms({"vader_analyzer": VaderAnalyzerRM(), "lexicon": load_rm("vader")}, ["tweets"])
>>> res["rms"]["lexicon"]["tweets"]["pairwise_accuracy"]  # {'value': ..., 'low': ..., 'high': ...}
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from irm.core.log import get_logger, progress
from irm.data.human import CORPORA, HumanCorpus, load_human_corpora
from irm.rewards.base import BaseRewardModel

__all__ = [
    "VaderAnalyzerRM",
    "METRICS",
    "human_agreement",
    "pair_stats",
    "score_corpus",
    "evaluate_rms",
    "plot_human_eval",
    "human_eval_rows",
    "VADER_TWEETS_R",
    "three_way",
    "three_way_rows",
]

log = get_logger(__name__)

#: Pearson r of VADER with the tweets' mean human ratings in Hutto & Gilbert (2014), Table 3.
VADER_TWEETS_R = 0.881
METRICS = ("pairwise_accuracy", "pearson", "kendall_tau")
_MAX_N = 6000  # pair matrices are n x n float32


class VaderAnalyzerRM(BaseRewardModel):
    """VADER's own analyzer as an RM: ``vaderSentiment``'s compound score (-1..1) of the response (with
    rules for negation, intensifiers, capitals, punctuation, "but"), the anchor of the human evaluation.
    The toolkit's lexicon RM (:class:`~irm.rewards.TokenUtilityRM`) uses VADER's word list without them."""

    name = "vader_analyzer"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        self._check_batch(prompts, responses)
        return np.array([self._analyzer.polarity_scores(r)["compound"] for r in responses], dtype=np.float64)


# ------------------------------------------------------------------------------------------ metrics
def pair_stats(h: np.ndarray, s: np.ndarray, counts: np.ndarray, margin: float) -> dict[str, np.ndarray]:
    """Pairwise accuracy, Kendall tau-b and Pearson r of scores ``s`` against references ``h`` (pairs whose
    references differ by >= ``margin``; a tie of ``s`` counts one half) for each row of ``counts`` ([B, n]
    multiplicities of the n texts: one bootstrap resample per row, or all ones for the point value)."""
    c = counts.astype(np.float32)
    dh = h[:, None] - h[None, :]
    sh = np.sign(dh).astype(np.float32)
    ss = np.sign(s[:, None] - s[None, :]).astype(np.float32)
    valid = ((np.abs(dh) >= margin) & (dh != 0)).astype(np.float32)
    agree = valid * ((sh == ss).astype(np.float32) + np.float32(0.5) * (ss == 0))

    def quad(m: np.ndarray) -> np.ndarray:
        return np.einsum("bi,bi->b", c @ m, c, dtype=np.float64)

    n_valid = quad(valid)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = quad(agree) / n_valid
        tau = quad(sh * ss) / np.sqrt(quad(np.abs(sh)) * quad(np.abs(ss)))
        w = c.astype(np.float64)
        tot = w.sum(1, keepdims=True)
        mh = (w * h).sum(1, keepdims=True) / tot
        ms = (w * s).sum(1, keepdims=True) / tot
        cov = (w * (h - mh) * (s - ms)).sum(1)
        r = cov / np.sqrt((w * (h - mh) ** 2).sum(1) * (w * (s - ms) ** 2).sum(1))
    return {"pairwise_accuracy": acc, "pearson": r, "kendall_tau": tau, "n_pairs": n_valid}


def human_agreement(means: Sequence[float], scores: Sequence[float], *, margin: float = 0.5, n_boot: int = 1000,
                    seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """Pairwise accuracy (pairs whose means differ by >= ``margin``), Pearson r and Kendall tau-b of ``scores``
    against the human ``means``, each ``{"value", "low", "high"}`` with a percentile-bootstrap CI over texts."""
    h = np.asarray(means, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if h.shape != s.shape or h.ndim != 1:
        raise ValueError(f"means and scores must be 1-d and of one length, got {h.shape} and {s.shape}.")
    if len(h) < 3:
        raise ValueError(f"Need at least 3 rated texts, got {len(h)}.")
    if len(h) > _MAX_N:
        raise ValueError(f"{len(h)} texts is more than the {_MAX_N} the pair matrices allow; evaluate a split.")
    if not np.isfinite(s).all():
        bad = np.flatnonzero(~np.isfinite(s))
        raise ValueError(f"{len(bad)} of {len(s)} scores are not finite (first at index {bad[0]}): the RM failed.")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}.")
    n = len(h)
    point = pair_stats(h, s, np.ones((1, n)), margin)
    rng = np.random.default_rng(seed)
    boots: dict[str, list[np.ndarray]] = {k: [] for k in METRICS}
    for start in range(0, n_boot, 100):
        b = min(100, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        counts = np.zeros((b, n), dtype=np.float32)
        np.add.at(counts, (np.repeat(np.arange(b), n), idx.ravel()), 1.0)
        stats = pair_stats(h, s, counts, margin)
        for k in METRICS:
            boots[k].append(stats[k])
    out: dict[str, Any] = {"n_texts": n, "n_pairs": int(round(point["n_pairs"][0] / 2)), "margin": margin}
    for k in METRICS:
        v = np.concatenate(boots[k]) if boots[k] else np.array([])
        v = v[np.isfinite(v)]
        lo, hi = np.quantile(v, [alpha / 2, 1 - alpha / 2]) if len(v) else (np.nan, np.nan)
        out[k] = {"value": float(point[k][0]), "low": float(lo), "high": float(hi)}
    return out


def score_corpus(rm: BaseRewardModel | Callable, corpus: HumanCorpus, *, use_instruction: bool = False,
                 batch_size: int = 64, desc: str = "") -> np.ndarray:
    """The RM's scores of a corpus's texts, each as the response to the corpus's instruction (``use_instruction``)
    or to an empty prompt."""
    prompt = corpus.instruction if use_instruction else ""
    # Scored shortest first, so a batch pads little (each text's score does not depend on its batch).
    order = np.argsort([len(t) for t in corpus.texts], kind="stable")
    out = np.empty(len(corpus), dtype=np.float64)
    for i in progress(range(0, len(corpus), batch_size), desc=desc or f"scoring {corpus.name}", unit="batch"):
        idx = order[i: i + batch_size]
        texts = [corpus.texts[k] for k in idx]
        out[idx] = np.asarray(rm.score([prompt] * len(texts), texts), dtype=np.float64)
    return out


def evaluate_rms(rms: Mapping[str, BaseRewardModel], corpora: Sequence[str] | None = None, *, split: str = "test",
                 margin: float = 0.5, n_boot: int = 1000, seed: int = 0,
                 use_instruction: Mapping[str, bool] | None = None, path: str | Path | None = None,
                 scores_out: dict[str, dict[str, np.ndarray]] | None = None,
                 corpora_out: dict[str, HumanCorpus] | None = None, max_texts: int | None = None) -> dict[str, Any]:
    """Every RM of ``rms`` (name -> RM) against the human means of each corpus's ``split``.

    Returns ``{"split", "margin", "n_boot", "corpora": {corpus: {"n_texts", "n_pairs"}}, "rms": {name: {corpus:
    human_agreement(...) + "seconds"}}}``. ``use_instruction[name]``: score texts as responses to the corpus's
    instruction (default False: to an empty prompt). ``scores_out`` / ``corpora_out`` (dicts), when given,
    receive each RM's scores per corpus (``scores_out[name][corpus]``) and the evaluated corpora.
    ``max_texts``: at most this many texts per corpus, a fixed random subset (seeded by ``seed`` and the
    corpus), the same for every RM."""
    if not rms:
        raise ValueError("No RM to evaluate; pass {name: rm}.")
    corpora = list(CORPORA) if corpora is None else list(corpora)
    loaded = [c.subset(split) for c in load_human_corpora(corpora, path=path)]
    if max_texts is not None:
        loaded = [_sample(c, max_texts, seed) for c in loaded]
    use_instruction = dict(use_instruction or {})
    unknown = sorted(set(use_instruction) - set(rms))
    if unknown:
        raise ValueError(f"use_instruction names RMs {unknown} that are not evaluated; RMs: {sorted(rms)}.")
    res: dict[str, Any] = {"split": split, "margin": margin, "n_boot": n_boot, "corpora": {}, "rms": {}}
    for c in loaded:
        res["corpora"][c.name] = {"n_texts": len(c), "mean_rating": float(c.means.mean())}
        if corpora_out is not None:
            corpora_out[c.name] = c
    for name, rm in rms.items():
        res["rms"][name] = {}
        for c in loaded:
            t0 = time.perf_counter()
            scores = score_corpus(rm, c, use_instruction=use_instruction.get(name, False), desc=f"{name} on {c.name}")
            m = human_agreement(c.means, scores, margin=margin, n_boot=n_boot, seed=seed)
            m["seconds"] = time.perf_counter() - t0
            res["rms"][name][c.name] = m
            if scores_out is not None:
                scores_out.setdefault(name, {})[c.name] = scores
            log.info("%s on %s/%s: pairwise accuracy %.3f [%.3f, %.3f], r %.3f, tau %.3f", name, c.name, split,
                     m["pairwise_accuracy"]["value"], m["pairwise_accuracy"]["low"], m["pairwise_accuracy"]["high"],
                     m["pearson"]["value"], m["kendall_tau"]["value"])
    return res


def _sample(c: HumanCorpus, n: int, seed: int) -> HumanCorpus:
    """At most ``n`` texts of ``c``: a random subset fixed by ``seed`` and the corpus name, in corpus order."""
    if len(c) <= n:
        return c
    import zlib

    rng = np.random.default_rng([seed, zlib.crc32(c.name.encode())])
    idx = np.sort(rng.choice(len(c), size=n, replace=False))
    return HumanCorpus(c.name, tuple(c.ids[i] for i in idx), tuple(c.texts[i] for i in idx), c.means[idx],
                       tuple(c.ratings[i] for i in idx), c.splits[idx])


# ------------------------------------------------------------------------------------ three sides
def _three_way_stats(h: np.ndarray, r: np.ndarray, q: np.ndarray, counts: np.ndarray,
                     margin: float) -> dict[str, np.ndarray]:
    c = counts.astype(np.float32)
    dh = h[:, None] - h[None, :]
    sh = np.sign(dh).astype(np.float32)
    sr = np.sign(r[:, None] - r[None, :]).astype(np.float32)
    sq = np.sign(q[:, None] - q[None, :]).astype(np.float32)
    human = ((np.abs(dh) >= margin) & (dh != 0)).astype(np.float32)
    against = human * (sr == -sh)  # the RM orders the pair against the humans (an RM tie is neither)
    with_h = human * (sr == sh)
    follows = (sq == sr) + np.float32(0.5) * (sq == 0)  # the IRM orders it as the RM does (a tie: half)
    decided = (sr != 0).astype(np.float32)

    def quad(m: np.ndarray) -> np.ndarray:
        return np.einsum("bi,bi->b", c @ m, c, dtype=np.float64)

    with np.errstate(invalid="ignore", divide="ignore"):
        return {"irm_follows_rm_where_rm_is_against_humans": quad(against * follows) / quad(against),
                "irm_follows_rm_where_rm_is_with_humans": quad(with_h * follows) / quad(with_h),
                "irm_vs_rm_pairwise_accuracy": quad(decided * follows) / quad(decided),
                "rm_against_humans_share": quad(against) / quad(human),
                "n_against": quad(against), "n_with": quad(with_h)}


_THREE_WAY = ("irm_follows_rm_where_rm_is_against_humans", "irm_follows_rm_where_rm_is_with_humans",
              "irm_vs_rm_pairwise_accuracy", "rm_against_humans_share")


def three_way(corpus: HumanCorpus, rm_scores: Sequence[float], irm_scores: Sequence[float], *, margin: float = 0.5,
              n_boot: int = 1000, seed: int = 0, n_examples: int = 4, alpha: float = 0.05) -> dict[str, Any]:
    """Humans, the explicit RM and an IRM on one corpus's texts: where the RM orders a pair of texts against
    the humans (their means differ by >= ``margin``), does the IRM (what the tuned policy learned) side
    with the RM or with the humans?

    Returns each rate of :data:`_THREE_WAY` as ``{"value", "low", "high"}`` (percentile bootstrap over
    texts), the pair counts, and ``examples``: the ``n_examples`` pairs the RM gets most clearly wrong
    (largest human difference), with both texts, their human means, RM and IRM scores, and whom the IRM
    follows. A rate of 1 where the RM is against the humans: the policy learned the RM, errors included."""
    h = np.asarray(corpus.means, dtype=np.float64)
    r = np.asarray(rm_scores, dtype=np.float64)
    q = np.asarray(irm_scores, dtype=np.float64)
    if not (h.shape == r.shape == q.shape) or h.ndim != 1:
        raise ValueError(f"means, RM scores and IRM scores must be 1-d of one length, got {h.shape}, {r.shape}, "
                         f"{q.shape}.")
    if len(h) > _MAX_N:
        raise ValueError(f"{len(h)} texts is more than the {_MAX_N} the pair matrices allow; evaluate a split.")
    if not (np.isfinite(r).all() and np.isfinite(q).all()):
        raise ValueError("RM or IRM scores are not finite: a scorer failed.")
    n = len(h)
    point = _three_way_stats(h, r, q, np.ones((1, n)), margin)
    rng = np.random.default_rng(seed)
    boots: dict[str, list[np.ndarray]] = {k: [] for k in _THREE_WAY}
    for start in range(0, n_boot, 100):
        b = min(100, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        counts = np.zeros((b, n), dtype=np.float32)
        np.add.at(counts, (np.repeat(np.arange(b), n), idx.ravel()), 1.0)
        st = _three_way_stats(h, r, q, counts, margin)
        for k in _THREE_WAY:
            boots[k].append(st[k])
    out: dict[str, Any] = {"n_texts": n, "margin": margin,
                           "n_pairs_rm_against_humans": int(round(point["n_against"][0] / 2)),
                           "n_pairs_rm_with_humans": int(round(point["n_with"][0] / 2))}
    for k in _THREE_WAY:
        v = np.concatenate(boots[k]) if boots[k] else np.array([])
        v = v[np.isfinite(v)]
        lo, hi = np.quantile(v, [alpha / 2, 1 - alpha / 2]) if len(v) else (np.nan, np.nan)
        out[k] = {"value": float(point[k][0]), "low": float(lo), "high": float(hi)}
    # The clearest human preferences the RM reverses (i: the text the humans rate higher).
    dh = h[:, None] - h[None, :]
    wrong = (dh >= max(margin, 1e-12)) & (r[:, None] < r[None, :])
    ii, jj = np.nonzero(wrong)
    order = np.lexsort((-(r[jj] - r[ii]), -dh[ii, jj]))[: max(0, n_examples) * 8]
    examples, used = [], set()
    for k in order:  # distinct texts across examples
        i, j = int(ii[k]), int(jj[k])
        if i in used or j in used:
            continue
        used.update((i, j))
        follows = "RM" if np.sign(q[i] - q[j]) == np.sign(r[i] - r[j]) else ("tie" if q[i] == q[j] else "humans")
        examples.append({"human_preferred": corpus.texts[i], "other": corpus.texts[j],
                         "human_means": [float(h[i]), float(h[j])], "rm_scores": [float(r[i]), float(r[j])],
                         "irm_scores": [float(q[i]), float(q[j])], "irm_follows": follows})
        if len(examples) >= n_examples:
            break
    out["examples"] = examples
    return out


def three_way_rows(res: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Table rows (IRM, corpus) of :func:`three_way` results ``{irm: {corpus: result}}``."""
    header = ["IRM", "corpus", "RM against humans (share of pairs)", "IRM follows RM where RM is against humans",
              "... where RM is with humans", "IRM vs RM pairwise accuracy", "pairs against"]
    rows = []
    for irm, per in res.items():
        for corpus, m in per.items():
            rows.append([irm, corpus, _ci(m["rm_against_humans_share"]),
                         _ci(m["irm_follows_rm_where_rm_is_against_humans"]),
                         _ci(m["irm_follows_rm_where_rm_is_with_humans"]), _ci(m["irm_vs_rm_pairwise_accuracy"]),
                         m["n_pairs_rm_against_humans"]])
    return header, rows


def _ci(m: Mapping[str, float]) -> str:
    return f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def human_eval_rows(res: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """A report table of :func:`evaluate_rms`'s result: one row per (RM, corpus)."""
    header = ["RM", "corpus", "texts", "pairs", "pairwise accuracy", "Pearson r", "Kendall tau"]
    rows = [[name, corpus, m["n_texts"], m["n_pairs"], _ci(m["pairwise_accuracy"]), _ci(m["pearson"]),
             _ci(m["kendall_tau"])]
            for name, per in res["rms"].items() for corpus, m in per.items()]
    return header, rows


def plot_human_eval(res: Mapping[str, Any], path: str | Path) -> Path:
    """Grouped bars: each RM's pairwise accuracy (and Pearson r) per corpus, with 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    names = list(res["rms"])
    corpora = list(res["corpora"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / max(len(names), 1)
    for ax, metric, label in ((axes[0], "pairwise_accuracy", "pairwise accuracy vs human means"),
                              (axes[1], "pearson", "Pearson r with human means")):
        for k, name in enumerate(names):
            vals = [res["rms"][name].get(c, {}).get(metric) for c in corpora]
            x = np.arange(len(corpora)) + (k - (len(names) - 1) / 2) * width
            v = np.array([m["value"] if m else np.nan for m in vals])
            lo = np.array([m["value"] - m["low"] if m else 0 for m in vals])
            hi = np.array([m["high"] - m["value"] if m else 0 for m in vals])
            ax.bar(x, v, width, yerr=[lo, hi], capsize=2, label=name)
        ax.set_xticks(np.arange(len(corpora)), corpora)
        ax.set_title(label, fontsize=10)
        if metric == "pairwise_accuracy":
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
            ax.set_ylim(0.4, 1.0)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Reward models against humans ({res['split']} split, margin {res['margin']:g}, 95% CIs)",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
