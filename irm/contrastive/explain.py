"""Contrastive explanations of reward-model comparisons (Jiang et al., arXiv 2411.16502).

For each comparison (prompt, chosen, rejected) and each reward model, :func:`explain` perturbs the
chosen response, the rejected one, or both, along each attribute, in both directions. A perturbed
comparison whose preference flips under an RM is a **counterfactual** (CF) for that RM; one that
really changed the attribute but kept the preference is a **semifactual** (SF). From these:

- **coverage**: share of comparisons with at least one CF (SF), with Wilson intervals, per RM and
  generator, and for the random baseline (random word substitutions of the same edit size);
- **distances**: syntactic (normalised word edit distance) and semantic (1 - cosine of
  all-MiniLM-L6-v2 embeddings) between a CF and its original; **diversity** among a comparison's CFs;
- **global sensitivity**: per RM and attribute, the preference flip rate (PFR) with a cluster
  bootstrap CI (comparisons resampled), the attribute ranking, Kendall's tau between RMs' rankings
  and between each comparison's local ranking and the global one; the **representative examples**
  are the comparisons whose local ranking best matches the global one;
- **disagreement** between RMs: flip agreement on the same perturbations and per-attribute PFR gaps;
- **validity**: how many perturbations were made, and how many really moved the attribute the
  intended way according to the attribute's own scorer. Only valid perturbations count as CFs/SFs.

A comparison an RM scores as a tie is left out of that RM's statistics (it has no preference to flip).
Two rewards are a tie when they are equal within a relative tolerance (``tie_rtol``, default 1e-9, and
an absolute 1e-12): 1.22 vs 1.2200000000000002 (a margin of -2.2e-16, float rounding) is a tie, not a
preference. Flips are strict: the margin must change sign; a perturbed tie is neither CF nor SF.

The **headline** (``sensitivity[rm][generator]["top"]``) names an attribute only when its PFR's 95% CI
lies entirely above the CI of the size-matched random baseline's PFR for that attribute (above 0 when
there is no baseline): the most-flipping attribute among those, else None. ``ranking`` still orders
every attribute by PFR.

The random baseline substitutes words from a **neutral vocabulary** (:func:`~irm.contrastive.perturb.neutral_vocabulary`):
everyday words with no VADER value, keeping those the RMs being explained react to least, so the
baseline measures edit size, not sentiment words. **Fluency**: with ``fluency=`` (an
:class:`~irm.contrastive.fluency.LMFluency`), perturbations whose perplexity exceeds
``max_perplexity_ratio`` times the original's are dropped (counted in ``summary()["fluency"]``); the
fluency attribute's own "less fluent" edits are exempt, being disfluent on purpose.

>>> from irm.rewards import TokenUtilityRM
>>> res = explain(load_comparisons("sample", limit=30), [TokenUtilityRM.from_vader()])
>>> res.summary()["coverage"]["vader"]["programmatic"]["cf_coverage"]
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from irm.contrastive.attributes import Attribute, resolve_attributes
from irm.contrastive.metrics import (
    MiniLMEmbedder,
    cluster_bootstrap_rate,
    kendall_tau,
    mean_pairwise,
    mean_pairwise_cosine_distance,
    ranking,
    wilson_interval,
)
from irm.contrastive.perturb import (
    Perturbation,
    PerturbationGenerator,
    ProgrammaticGenerator,
    RandomSubstitution,
    item_rng,
    neutral_vocabulary,
)
from irm.contrastive.textops import normalized_edit_distance, words
from irm.core.log import get_logger

__all__ = ["Comparison", "Candidate", "ContrastiveResult", "explain", "TARGETS", "baseline_name", "tie_margins",
           "DEFAULT_MAX_PERPLEXITY_RATIO"]

log = get_logger(__name__)

TARGETS = ("chosen", "rejected", "both")
DEFAULT_MAX_PERPLEXITY_RATIO = 2.5
TIE_ATOL = 1e-12


def tie_margins(a: np.ndarray, b: np.ndarray, *, rtol: float = 1e-9, atol: float = TIE_ATOL) -> np.ndarray:
    """``a - b``, with 0 wherever ``a`` and ``b`` are equal within ``rtol`` (relative to the larger) or ``atol``.

    >>> tie_margins(np.array([1.22, 1.0]), np.array([1.2200000000000002, 0.5]))
    array([0. , 0.5])
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    m = a - b
    tie = np.abs(m) <= np.maximum(rtol * np.maximum(np.abs(a), np.abs(b)), atol)
    return np.where(tie, 0.0, m)


@dataclass(frozen=True)
class Comparison:
    """One binary comparison: the labelled ``chosen`` and ``rejected`` responses to ``prompt``.

    The RMs need not agree with the label: each RM's own preference on the original is what a
    perturbation flips or keeps.
    """

    prompt: str
    chosen: str
    rejected: str
    id: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


@dataclass(eq=False)
class Candidate:
    """A perturbed comparison. ``directions`` = (chosen, rejected), each +1, -1 or 0 (untouched)."""

    comparison: int
    generator: str
    attribute: str
    target: str
    directions: tuple[int, int]
    variant: int
    chosen: Perturbation | None
    rejected: Perturbation | None
    valid: bool
    syntactic: float = 0.0
    semantic: float | None = None
    twin_of: int | None = None  # random baseline: index of the candidate whose edit size it matches
    fluency_ratio: float | None = None  # the largest perplexity ratio of its sides (None: not measured)

    @property
    def label(self) -> str:
        sign = {1: "+", -1: "-"}
        parts = [f"{side}{sign[d]}" for side, d in zip(("chosen", "rejected"), self.directions) if d]
        return " ".join(parts)

    def texts(self, comp: Comparison) -> tuple[str, str]:
        return (self.chosen.text if self.chosen else comp.chosen, self.rejected.text if self.rejected else comp.rejected)

    def sides(self) -> list[Perturbation]:
        return [p for p in (self.chosen, self.rejected) if p is not None]


def baseline_name(generator: str) -> str:
    """Name of the random baseline matched to ``generator``'s edit sizes."""
    return "random" if generator == "programmatic" else f"random_{generator}"


def _as_rm_dict(rms: Any) -> dict[str, Any]:
    from irm.rewards.base import RewardModel

    if isinstance(rms, Mapping):
        out = dict(rms)
    else:
        if isinstance(rms, RewardModel):
            rms = [rms]
        out = {}
        for rm in rms:
            name = getattr(rm, "name", None)
            if not name:
                raise ValueError(f"Reward model {rm!r} has no name; pass a dict name -> RM instead.")
            if name in out:
                raise ValueError(f"Two reward models are named {name!r}; pass a dict with distinct names, "
                                 "e.g. {'vader': rm1, 'linear_irm': rm2}.")
            out[name] = rm
    if not out:
        raise ValueError("No reward models to explain; pass at least one RewardModel.")
    for name, rm in out.items():
        if not callable(getattr(rm, "score", None)):
            raise TypeError(f"Reward model {name!r} ({type(rm).__name__}) has no score(prompts, responses) method; "
                            "it must implement irm.rewards.RewardModel.")
    return out


# ----------------------------------------------------------------------------------------------
@dataclass
class ContrastiveResult:
    """Everything :func:`explain` found; :meth:`summary` is the JSON-able report."""

    comparisons: list[Comparison]
    rm_names: list[str]
    attributes: list[str]
    generators: list[str]
    candidates: list[Candidate]
    original_margins: dict[str, np.ndarray]
    margins: dict[str, np.ndarray]
    n_by_generator: dict[str, int]
    validity: dict[str, Any]
    settings: dict[str, Any]
    parse_logs: dict[str, Any] = field(default_factory=dict)
    fluency: dict[str, Any] = field(default_factory=dict)
    twin_vectors: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _summary: dict[str, Any] | None = field(default=None, repr=False)
    _outcomes: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    # ---------------------------------------------------------------- per-candidate outcomes
    @property
    def baselines(self) -> list[str]:
        present = {c.generator for c in self.candidates}
        return [baseline_name(g) for g in self.generators if baseline_name(g) in present]

    def outcomes(self, rm: str) -> np.ndarray:
        """Per candidate: "cf", "sf", "tie" (perturbed margin exactly 0), "undefined" (the original is a
        tie for this RM) or "invalid" (a perturbation did not change the attribute as intended)."""
        if rm in self._outcomes:
            return self._outcomes[rm]
        m0 = self.original_margins[rm][[c.comparison for c in self.candidates]]
        m1 = self.margins[rm]
        valid = np.array([c.valid for c in self.candidates], dtype=bool)
        out = np.full(len(self.candidates), "sf", dtype=object)
        out[m0 * m1 < 0] = "cf"
        out[m1 == 0] = "tie"
        out[m0 == 0] = "undefined"
        out[~valid] = "invalid"
        out.setflags(write=False)
        self._outcomes[rm] = out
        return out

    def _eligible(self, rm: str, generator: str) -> np.ndarray:
        main = generator if generator in self.generators else next(
            g for g in self.generators if baseline_name(g) == generator)
        n = self.n_by_generator[main]
        ok = self.original_margins[rm] != 0
        ok[n:] = False
        return ok

    # ---------------------------------------------------------------- metrics
    def coverage(self, rm: str, generator: str) -> dict[str, Any]:
        out = self.outcomes(rm)
        eligible = self._eligible(rm, generator)
        n = int(eligible.sum())
        idx = [i for i, c in enumerate(self.candidates) if c.generator == generator]
        res: dict[str, Any] = {"n_comparisons": n}

        def cov(kind: str, sub: list[int]) -> dict[str, Any]:
            comps = {self.candidates[i].comparison for i in sub if out[i] == kind}
            k = len(comps)
            lo, hi = wilson_interval(k, n)
            return {"coverage": k / n if n else None, "ci": [lo, hi], "n_with": k,
                    "n_found": sum(out[i] == kind for i in sub)}

        for kind in ("cf", "sf"):
            c = cov(kind, idx)
            res[f"{kind}_coverage"], res[f"{kind}_coverage_ci"] = c["coverage"], c["ci"]
            res[f"n_{kind}"] = c["n_found"]
            res[f"{kind}_coverage_by_target"] = {
                t: cov(kind, [i for i in idx if self.candidates[i].target == t])["coverage"] for t in TARGETS
                if any(self.candidates[i].target == t for i in idx)}
        res["n_candidates"] = len(idx)
        res["n_valid"] = int(sum(out[i] in ("cf", "sf", "tie") for i in idx))
        # Without the validity filter: what coverage would be if every changed text counted.
        m0 = self.original_margins[rm]
        raw = {self.candidates[i].comparison for i in idx
               if eligible[self.candidates[i].comparison] and m0[self.candidates[i].comparison] * self.margins[rm][i] < 0}
        res["cf_coverage_unfiltered"] = len(raw) / n if n else None
        for kind in ("cf", "sf"):
            sel = [i for i in idx if out[i] == kind]
            syn = [self.candidates[i].syntactic for i in sel]
            sem = [self.candidates[i].semantic for i in sel if self.candidates[i].semantic is not None]
            res[f"{kind}_syntactic_distance"] = float(np.mean(syn)) if syn else None
            res[f"{kind}_semantic_distance"] = float(np.mean(sem)) if sem else None
        # The closest CF of each comparison: how small an edit suffices.
        best: dict[int, float] = {}
        for i in idx:
            if out[i] == "cf":
                cand = self.candidates[i]
                best[cand.comparison] = min(best.get(cand.comparison, math.inf), cand.syntactic)
        res["closest_cf_syntactic_distance"] = float(np.mean(list(best.values()))) if best else None
        res.update(self._diversity([i for i in idx if out[i] == "cf"]))
        return res

    def _diversity(self, cf_idx: list[int], max_per_comparison: int = 20) -> dict[str, Any]:
        by_comp: dict[int, list[int]] = defaultdict(list)
        for i in cf_idx:
            by_comp[self.candidates[i].comparison].append(i)
        sem, syn = [], []
        for comp, items in sorted(by_comp.items()):
            if len(items) < 2:
                continue
            if len(items) > max_per_comparison:  # a fixed subsample keeps the pair count bounded
                items = sorted(item_rng(0, "diversity", comp).choice(items, max_per_comparison, replace=False).tolist())
            texts = [" || ".join(self.candidates[i].texts(self.comparisons[comp])) for i in items]
            syn.append(mean_pairwise(texts, normalized_edit_distance))
            if all(i in self.twin_vectors for i in items):
                sem.append(mean_pairwise_cosine_distance(np.stack([self.twin_vectors[i] for i in items])))
        return {"cf_diversity_syntactic": float(np.mean(syn)) if syn else None,
                "cf_diversity_semantic": float(np.mean(sem)) if sem else None,
                "n_comparisons_with_2plus_cf": len(syn)}

    def pfr_counts(self, rm: str, generator: str) -> tuple[np.ndarray, np.ndarray]:
        """``(flips, totals)``, each ``int[n_comparisons, n_attributes]``, over valid candidates."""
        out = self.outcomes(rm)
        eligible = self._eligible(rm, generator)
        a_idx = {a: j for j, a in enumerate(self.attributes)}
        flips = np.zeros((len(self.comparisons), len(self.attributes)), dtype=np.int64)
        totals = np.zeros_like(flips)
        for i, c in enumerate(self.candidates):
            if c.generator != generator or out[i] in ("invalid", "undefined") or not eligible[c.comparison]:
                continue
            totals[c.comparison, a_idx[c.attribute]] += 1
            flips[c.comparison, a_idx[c.attribute]] += out[i] == "cf"
        return flips, totals

    def sensitivity(self, rm: str, generator: str, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
        flips, totals = self.pfr_counts(rm, generator)
        pfr: dict[str, Any] = {}
        base = baseline_name(generator)
        has_base = base in self.baselines
        bflips, btotals = self.pfr_counts(rm, base) if has_base else (None, None)
        for j, a in enumerate(self.attributes):
            n, k = int(totals[:, j].sum()), int(flips[:, j].sum())
            lo, hi = cluster_bootstrap_rate(flips[:, j], totals[:, j], n_boot=n_boot, seed=seed + j)
            entry = {"pfr": k / n if n else None, "ci": [lo, hi], "n": n, "n_flips": k}
            if bflips is not None and btotals is not None:
                bn = int(btotals[:, j].sum())
                entry["random_pfr"] = int(bflips[:, j].sum()) / bn if bn else None
                entry["random_ci"] = list(cluster_bootstrap_rate(bflips[:, j], btotals[:, j], n_boot=n_boot,
                                                                 seed=seed + 7919 + j))
                entry["random_n"] = bn
            pfr[a] = entry
        values = {a: e["pfr"] for a, e in pfr.items()}
        rank = ranking(values)

        def clears(e: dict[str, Any]) -> bool:
            """The PFR's CI lies above the random baseline's CI (above 0 without a baseline)."""
            lo = e["ci"][0]
            if lo is None or not e["pfr"]:
                return False
            if not has_base:
                return lo > 0
            r_hi = (e.get("random_ci") or [None, None])[1]
            return lo > (r_hi if r_hi is not None else 0.0)

        sensitive = [a for a in rank if clears(pfr[a])]
        local = self.local_taus(rm, generator, values, flips, totals)
        taus = [t for t in local.values() if t is not None]
        return {"pfr": pfr, "ranking": rank, "top": sensitive[0] if sensitive else None,
                "top_rule": ("the highest PFR whose 95% CI lies above the size-matched random baseline's CI"
                             if has_base else "the highest PFR whose 95% CI lies above 0 (no random baseline)"),
                "sensitive": sensitive,
                "local_global_tau": {"mean": float(np.mean(taus)) if taus else None,
                                     "median": float(np.median(taus)) if taus else None, "n": len(taus),
                                     "n_undefined": len(local) - len(taus)}}

    def local_taus(self, rm: str, generator: str, global_pfr: Mapping[str, float | None],
                   flips: np.ndarray | None = None, totals: np.ndarray | None = None) -> dict[int, float | None]:
        """Kendall tau between each comparison's local PFR ranking and the global one."""
        if flips is None or totals is None:
            flips, totals = self.pfr_counts(rm, generator)
        out: dict[int, float | None] = {}
        for i in range(len(self.comparisons)):
            if totals[i].sum() == 0:
                continue
            local = {a: flips[i, j] / totals[i, j] for j, a in enumerate(self.attributes) if totals[i, j]}
            out[i] = kendall_tau(local, {a: v for a, v in global_pfr.items() if v is not None})
        return out

    def examples(self, rm: str, generator: str, *, n_examples: int = 3, per_kind: int = 3) -> list[dict[str, Any]]:
        """Representative comparisons (local ranking closest to the global one) with their CFs and SFs."""
        sens = self.sensitivity(rm, generator, n_boot=10)
        values = {a: e["pfr"] for a, e in sens["pfr"].items()}
        taus = self.local_taus(rm, generator, values)
        out = self.outcomes(rm)
        n_cf = Counter(self.candidates[i].comparison for i in range(len(out))
                       if out[i] == "cf" and self.candidates[i].generator == generator)
        order = sorted((i for i, t in taus.items() if t is not None), key=lambda i: (-(taus[i] or 0.0), -n_cf[i], i))
        rows = []
        flips, totals = self.pfr_counts(rm, generator)
        for i in order[:n_examples]:
            comp = self.comparisons[i]
            local = {a: float(flips[i, j] / totals[i, j]) for j, a in enumerate(self.attributes) if totals[i, j]}
            rows.append({
                "comparison": comp.to_dict(), "index": i, "margin": float(self.original_margins[rm][i]),
                "local_global_tau": taus[i], "local_ranking": ranking(local), "local_pfr": local,
                "counterfactuals": self._pick(rm, i, generator, "cf", per_kind),
                "semifactuals": self._pick(rm, i, generator, "sf", per_kind),
            })
        return rows

    def _pick(self, rm: str, comp: int, generator: str, kind: str, k: int) -> list[dict[str, Any]]:
        """Up to ``k`` explanations of one kind, smallest edits first, one per attribute where possible."""
        out = self.outcomes(rm)
        idx = [i for i, c in enumerate(self.candidates)
               if c.comparison == comp and c.generator == generator and out[i] == kind]
        idx.sort(key=lambda i: (self.candidates[i].syntactic, i))
        chosen: list[int] = []
        seen: set[str] = set()
        for i in idx:  # first the smallest edit of each attribute, then fill up with the next smallest
            if len(chosen) < k and self.candidates[i].attribute not in seen:
                chosen.append(i)
                seen.add(self.candidates[i].attribute)
        for i in idx:
            if len(chosen) >= k:
                break
            if i not in chosen:
                chosen.append(i)
        return [self._explanation(rm, i) for i in chosen]

    def _explanation(self, rm: str, i: int) -> dict[str, Any]:
        c = self.candidates[i]
        ch, rj = c.texts(self.comparisons[c.comparison])
        return {"attribute": c.attribute, "perturbed": c.label, "generator": c.generator,
                "chosen": ch, "rejected": rj, "margin": float(self.margins[rm][i]),
                "syntactic_distance": c.syntactic, "semantic_distance": c.semantic,
                "edits": [{"side": side, **e.to_dict()} for side, p in (("chosen", c.chosen), ("rejected", c.rejected))
                          if p is not None for e in p.edits][:6]}

    def disagreement(self, rm_a: str, rm_b: str, generator: str, *, n_examples: int = 3) -> dict[str, Any]:
        """Where two RMs react differently to the same perturbations."""
        oa, ob = self.outcomes(rm_a), self.outcomes(rm_b)
        both = [i for i, c in enumerate(self.candidates) if c.generator == generator
                and oa[i] in ("cf", "sf", "tie") and ob[i] in ("cf", "sf", "tie")]
        fa = np.array([oa[i] == "cf" for i in both], dtype=bool)
        fb = np.array([ob[i] == "cf" for i in both], dtype=bool)
        sa = self.sensitivity(rm_a, generator, n_boot=10)["pfr"]
        sb = self.sensitivity(rm_b, generator, n_boot=10)["pfr"]
        gaps = {a: (sa[a]["pfr"] - sb[a]["pfr"]) if sa[a]["pfr"] is not None and sb[a]["pfr"] is not None else None
                for a in self.attributes}

        def ex(mask: np.ndarray) -> list[dict[str, Any]]:
            sel = [both[j] for j in np.flatnonzero(mask)]
            sel.sort(key=lambda i: (self.candidates[i].syntactic, i))
            rows = []
            for i in sel[:n_examples]:
                e = self._explanation(rm_a, i)
                e[f"margin_{rm_a}"] = e.pop("margin")
                e[f"margin_{rm_b}"] = float(self.margins[rm_b][i])
                e["comparison"] = self.comparisons[self.candidates[i].comparison].to_dict()
                rows.append(e)
            return rows

        return {
            "rms": [rm_a, rm_b], "generator": generator, "n_candidates": len(both),
            "flip_agreement": float(np.mean(fa == fb)) if both else None,
            "n_both_flip": int((fa & fb).sum()), f"n_only_{rm_a}": int((fa & ~fb).sum()),
            f"n_only_{rm_b}": int((~fa & fb).sum()),
            "rank_tau": kendall_tau({a: v["pfr"] for a, v in sa.items() if v["pfr"] is not None},
                                    {a: v["pfr"] for a, v in sb.items() if v["pfr"] is not None}),
            "pfr_gap": gaps,
            "largest_gaps": [a for a in sorted(gaps, key=lambda a: -abs(gaps[a] or 0.0)) if gaps[a]][:3],
            f"examples_only_{rm_a}_flips": ex(fa & ~fb), f"examples_only_{rm_b}_flips": ex(~fa & fb),
        }

    # ---------------------------------------------------------------- report
    def summary(self, *, n_examples: int | None = None, n_boot: int | None = None) -> dict[str, Any]:
        """The JSON-able report: coverage, sensitivity, rank agreement, disagreement, validity, examples."""
        if self._summary is not None and n_examples is None and n_boot is None:
            return self._summary
        n_examples = self.settings.get("n_examples", 3) if n_examples is None else n_examples
        n_boot = self.settings.get("n_bootstrap", 1000) if n_boot is None else n_boot
        seed = int(self.settings.get("seed", 0))
        gens = self.generators + self.baselines
        agree = {rm: float(np.mean(self.original_margins[rm] > 0)) for rm in self.rm_names}
        ties = {rm: int(np.sum(self.original_margins[rm] == 0)) for rm in self.rm_names}
        s: dict[str, Any] = {
            "settings": self.settings, "n_comparisons": len(self.comparisons), "rms": self.rm_names,
            "attributes": self.attributes, "generators": self.generators, "baselines": self.baselines,
            "n_by_generator": self.n_by_generator,
            "original": {"share_preferring_chosen": agree, "n_ties": ties},
            "coverage": {rm: {g: self.coverage(rm, g) for g in gens} for rm in self.rm_names},
            "sensitivity": {rm: {g: self.sensitivity(rm, g, n_boot=n_boot, seed=seed) for g in self.generators}
                            for rm in self.rm_names},
            "validity": self.validity,
        }
        s["rank_agreement"] = {
            g: {f"{a}|{b}": kendall_tau({k: v["pfr"] for k, v in s["sensitivity"][a][g]["pfr"].items() if v["pfr"] is not None},
                                        {k: v["pfr"] for k, v in s["sensitivity"][b][g]["pfr"].items() if v["pfr"] is not None})
                for ia, a in enumerate(self.rm_names) for b in self.rm_names[ia + 1:]}
            for g in self.generators}
        first = self.rm_names[0]
        s["disagreement"] = [self.disagreement(first, b, g) for g in self.generators for b in self.rm_names[1:]]
        s["examples"] = {rm: {g: self.examples(rm, g, n_examples=n_examples) for g in self.generators}
                         for rm in self.rm_names}
        if self.parse_logs:
            s["llm_parsing"] = self.parse_logs
        if self.fluency:
            s["fluency"] = self.fluency
        if n_examples == self.settings.get("n_examples", 3) and n_boot == self.settings.get("n_bootstrap", 1000):
            self._summary = s
        return s

    def candidate_rows(self, rm: str, *, limit: int = 2000) -> tuple[list[str], list[list[Any]]]:
        """A flat table of perturbed comparisons (for wandb): one row per candidate, up to ``limit``."""
        cols = ["comparison", "generator", "attribute", "perturbed", "valid", "outcome", "margin_original",
                "margin", "syntactic", "semantic", "chosen", "rejected"]
        out = self.outcomes(rm)
        rows = []
        for i, c in enumerate(self.candidates[:limit]):
            ch, rj = c.texts(self.comparisons[c.comparison])
            rows.append([self.comparisons[c.comparison].id or str(c.comparison), c.generator, c.attribute, c.label,
                         bool(c.valid), str(out[i]), float(self.original_margins[rm][c.comparison]),
                         float(self.margins[rm][i]), float(c.syntactic),
                         None if c.semantic is None else float(c.semantic), ch, rj])
        return cols, rows


# ----------------------------------------------------------------------------------------------
def _validity_entry() -> dict[str, Any]:
    return {"n": 0, "ok": 0, "not_applicable": 0, "failed": 0, "disfluent": 0, "scored": 0, "moved": 0, "deltas": [],
            "reasons": Counter()}


def _finish_validity(v: dict[str, Any]) -> dict[str, Any]:
    deltas = v.pop("deltas")
    reasons = v.pop("reasons")
    v["ok_rate"] = v["ok"] / v["n"] if v["n"] else None
    v["moved_rate"] = v["moved"] / v["scored"] if v["scored"] else None
    v["mean_scorer_delta"] = float(np.mean(deltas)) if deltas else None
    v["top_reasons"] = [{"reason": r, "n": n} for r, n in reasons.most_common(3)]
    return v


def explain(
    comparisons: Sequence[Comparison],
    rms: Any,
    *,
    attributes: Sequence[str | Attribute] | None = None,
    generators: Sequence[PerturbationGenerator] | None = None,
    targets: Sequence[str] = TARGETS,
    n_variants: int = 1,
    random_baseline: bool = True,
    limits: Mapping[str, int] | None = None,
    embedder: Any = "minilm",
    seed: int = 0,
    n_bootstrap: int = 1000,
    n_examples: int = 3,
    score_batch: int = 1024,
    semantic_sample: int = 300,
    fluency: Any = None,
    max_perplexity_ratio: float | None = DEFAULT_MAX_PERPLEXITY_RATIO,
    random_vocabulary: str | Sequence[str] = "neutral",
    tie_rtol: float = 1e-9,
) -> ContrastiveResult:
    """Explain ``comparisons`` under every RM in ``rms`` (a list of RewardModels or a dict name -> RM).

    ``generators``: perturbation generators (default: the programmatic one). ``limits``: at most this
    many comparisons for a generator (e.g. ``{"llm_rewrite": 5}``: LLM rewrites are slow on a CPU).
    ``n_variants``: perturbation seeds per (comparison, attribute, direction); identical perturbed
    comparisons are counted once. ``embedder``: ``"minilm"`` (all-MiniLM-L6-v2), any object with
    ``encode(texts) -> float[n, d]``, or None (no semantic distances). Semantic distances are computed
    for every candidate that is a CF under some RM and for a fixed random ``semantic_sample`` of the
    other valid candidates of each generator (SF statistics are estimated on that sample).
    ``fluency``: an object with ``perplexity(prompts, texts) -> float[n]`` (:class:`~irm.contrastive.fluency.LMFluency`)
    or None (no fluency check); perturbations above ``max_perplexity_ratio`` times the original's
    perplexity are dropped (None: measured and reported, nothing dropped). ``random_vocabulary``:
    ``"neutral"`` (default, :func:`~irm.contrastive.perturb.neutral_vocabulary` for these RMs),
    ``"responses"`` (the words of the responses: mostly sentiment words, the old baseline) or a word list.
    ``tie_rtol``: rewards equal within this relative tolerance are a tie (see the module doc).

    >>> res = explain(comparisons, {"vader": TokenUtilityRM.from_vader(), "linear_irm": irm},
    ...               generators=[ProgrammaticGenerator()], n_variants=2)
    >>> res.summary()["sensitivity"]["vader"]["programmatic"]["ranking"][:3]
    """
    comparisons = list(comparisons)
    if not comparisons:
        raise ValueError("No comparisons to explain; load some with irm.contrastive.load_comparisons(...).")
    for i, c in enumerate(comparisons):
        if not isinstance(c, Comparison):
            raise TypeError(f"comparisons[{i}] is {type(c).__name__}; build Comparison(prompt, chosen, rejected).")
    rm_dict = _as_rm_dict(rms)
    attrs = resolve_attributes(attributes)
    gens = list(generators) if generators is not None else [ProgrammaticGenerator()]
    names = [g.name for g in gens]
    if not gens or len(set(names)) != len(names):
        raise ValueError(f"generators must be a non-empty list with distinct names, got {names}")
    if any(n.startswith("random") for n in names):
        raise ValueError(f"generator names starting with 'random' are reserved for the baseline, got {names}")
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"targets must be a non-empty subset of {TARGETS}, got {list(targets)}")
    if n_variants < 1:
        raise ValueError(f"n_variants must be >= 1, got {n_variants}")
    limits = dict(limits or {})
    unknown = set(limits) - set(names)
    if unknown:
        raise ValueError(f"limits name generators {sorted(unknown)} that are not in use ({names})")
    n_by_gen = {g.name: min(len(comparisons), int(limits.get(g.name, len(comparisons)))) for g in gens}
    if max_perplexity_ratio is not None and not (isinstance(max_perplexity_ratio, (int, float))
                                                 and max_perplexity_ratio > 1):
        raise ValueError(f"max_perplexity_ratio must be a number > 1 (or None: drop nothing), got "
                         f"{max_perplexity_ratio!r}")
    if fluency is not None and not callable(getattr(fluency, "perplexity", None)):
        raise TypeError(f"fluency must have perplexity(prompts, texts) (e.g. irm.contrastive.LMFluency), got "
                        f"{type(fluency).__name__}")
    if not (0 <= tie_rtol < 1):
        raise ValueError(f"tie_rtol must be in [0, 1), got {tie_rtol}")
    if isinstance(random_vocabulary, str) and random_vocabulary not in ("neutral", "responses"):
        raise ValueError(f"random_vocabulary must be 'neutral', 'responses' or a list of words, got "
                         f"{random_vocabulary!r}")

    # ---- 1. perturb every response along every attribute, both directions
    perts: dict[tuple, Perturbation] = {}
    validity: dict[str, Any] = {}
    score_cache: dict[tuple[str, str], float | None] = {}

    def attr_score(a: Attribute, text: str) -> float | None:
        key = (a.name, text)
        if key not in score_cache:
            score_cache[key] = a.score(text)
        return score_cache[key]

    valid_p: dict[int, bool] = {}
    key_of: dict[int, tuple] = {}
    for g in gens:
        n = n_by_gen[g.name]
        prompts = [cmp.prompt for cmp in comparisons[:n]] * 2
        texts = [cmp.chosen for cmp in comparisons[:n]] + [cmp.rejected for cmp in comparisons[:n]]
        for a in attrs:
            for d in (1, -1):
                vkey = f"{g.name}/{a.name}/{'+' if d > 0 else '-'}"
                v = validity.setdefault(vkey, _validity_entry())
                seen_texts: set[tuple[int, str]] = set()
                for var in range(n_variants):
                    out = g.perturb(texts, a, d, prompts=prompts, seed=seed + var)
                    if len(out) != len(texts):
                        raise RuntimeError(f"Generator {g.name!r} returned {len(out)} perturbations for {len(texts)} "
                                           "texts; a generator must return exactly one per text.")
                    for j, p in enumerate(out):
                        side, i = ("chosen", j) if j < n else ("rejected", j - n)
                        perts[(g.name, a.name, d, var, side, i)] = p
                        key_of[id(p)] = (g.name, a.name, d, var, side, i)
                        if (j, p.text) in seen_texts:  # a repeat of an earlier variant: counted once
                            valid_p[id(p)] = p.ok and _moved(a, p, d, attr_score) is not False
                            continue
                        seen_texts.add((j, p.text))
                        v["n"] += 1
                        v[p.status if p.status != "ok" or p.ok else "not_applicable"] += 1
                        if p.reason:
                            v["reasons"][p.reason[:120]] += 1
                        moved = _moved(a, p, d, attr_score) if p.ok else None
                        if p.ok and moved is not None:
                            v["scored"] += 1
                            v["moved"] += bool(moved)
                            v["deltas"].append(d * (attr_score(a, p.text) - attr_score(a, p.original)))  # type: ignore[operator]
                        valid_p[id(p)] = p.ok and moved is not False
    # ---- 1b. fluency under a language model: drop perturbations a reader would not accept
    fluency_info: dict[str, Any] = {}
    ratio_of: dict[int, float] = {}
    if fluency is not None:
        checked = [(key, p) for key, p in perts.items() if p.ok and valid_p.get(id(p), False)
                   and not (key[1] == "fluency" and key[2] < 0)]  # "less fluent" edits are disfluent on purpose
        pairs = {}
        for key, p in checked:
            prompt = comparisons[key[5]].prompt
            pairs.setdefault((prompt, p.original), None)
            pairs.setdefault((prompt, p.text), None)
        keys_f = list(pairs)
        ppl = np.asarray(fluency.perplexity([k[0] for k in keys_f], [k[1] for k in keys_f]), dtype=np.float64)
        if ppl.shape != (len(keys_f),) or not np.all(np.isfinite(ppl)):
            raise FloatingPointError(f"fluency model {getattr(fluency, 'name', fluency)!r} returned shape {ppl.shape} "
                                     f"or non-finite perplexities for {len(keys_f)} texts")
        pp = dict(zip(keys_f, ppl))
        by: dict[str, dict[str, Any]] = {}
        dropped_examples = []
        for key, p in checked:
            prompt = comparisons[key[5]].prompt
            r = float(pp[(prompt, p.text)] / max(pp[(prompt, p.original)], 1e-12))
            ratio_of[id(p)] = r
            vkey = f"{key[0]}/{key[1]}/{'+' if key[2] > 0 else '-'}"
            e = by.setdefault(vkey, {"n_checked": 0, "n_dropped": 0, "ratios": []})
            e["n_checked"] += 1
            e["ratios"].append(r)
            if max_perplexity_ratio is not None and r > max_perplexity_ratio:
                e["n_dropped"] += 1
                valid_p[id(p)] = False
                validity[vkey]["disfluent"] += 1
                if len(dropped_examples) < 8:
                    dropped_examples.append({"key": vkey, "ratio": r, "original": p.original, "text": p.text})
        all_r = [r for e in by.values() for r in e["ratios"]]
        for e in by.values():
            rs = e.pop("ratios")
            e["median_ratio"] = float(np.median(rs)) if rs else None
            e["max_ratio"] = float(np.max(rs)) if rs else None
        fluency_info = {
            "model": getattr(fluency, "name", type(fluency).__name__), "max_perplexity_ratio": max_perplexity_ratio,
            "n_checked": len(all_r), "n_dropped": sum(e["n_dropped"] for e in by.values()),
            "share_dropped": (sum(e["n_dropped"] for e in by.values()) / len(all_r)) if all_r else None,
            "ratio_quantiles": {str(q): float(np.quantile(all_r, q)) for q in (0.5, 0.9, 0.99)} if all_r else {},
            "exempt": "fluency/- (less fluent on purpose)", "by": by, "dropped_examples": dropped_examples}
        log.info("contrastive: fluency (%s): %d of %d perturbations above %s x the original's perplexity dropped",
                 fluency_info["model"], fluency_info["n_dropped"], len(all_r), max_perplexity_ratio)
    validity = {k: _finish_validity(v) for k, v in validity.items()}

    # ---- 2. perturbed comparisons (candidates), deduplicated across variants
    combos = {"chosen": [(1, 0), (-1, 0)], "rejected": [(0, 1), (0, -1)],
              "both": [(1, 1), (1, -1), (-1, 1), (-1, -1)]}
    cands: list[Candidate] = []
    for g in gens:
        for i in range(n_by_gen[g.name]):
            for a in attrs:
                for t in targets:
                    seen: set[tuple] = set()
                    for dc, dr in combos[t]:
                        for var in range(n_variants):
                            pc = perts[(g.name, a.name, dc, var, "chosen", i)] if dc else None
                            pr = perts[(g.name, a.name, dr, var, "rejected", i)] if dr else None
                            sides = [p for p in (pc, pr) if p is not None]
                            if not all(p.ok for p in sides):
                                continue
                            key = (pc.text if pc else "", pr.text if pr else "")
                            if (dc, dr, *key) in seen:
                                continue
                            seen.add((dc, dr, *key))  # type: ignore[arg-type]
                            rs = [ratio_of[id(p)] for p in sides if id(p) in ratio_of]
                            cands.append(Candidate(i, g.name, a.name, t, (dc, dr), var, pc, pr,
                                                   valid=all(valid_p[id(p)] for p in sides),
                                                   fluency_ratio=max(rs) if rs else None))

    # ---- 3. the random baseline: same sides, same word edit sizes, random substitutions
    vocab_info: dict[str, Any] | None = None
    if random_baseline:
        # One random twin per perturbation (same substitution/insertion/deletion counts); a random
        # candidate combines the twins of its main candidate's sides, so both sets share a structure.
        if isinstance(random_vocabulary, str) and random_vocabulary == "neutral":
            # Each word scored as a one-word response to a real prompt (an IRM needs a context to read).
            vocab, vocab_info = neutral_vocabulary(rm_dict, prompt=comparisons[0].prompt)
        elif isinstance(random_vocabulary, str):
            vocab = [w for cmp in comparisons for r in (cmp.chosen, cmp.rejected) for w in words(r)]
            vocab_info = {"source": "responses", "n_kept": len(set(vocab))}
        else:
            vocab, vocab_info = list(random_vocabulary), {"source": "given", "n_kept": len(set(random_vocabulary))}
        rnd = RandomSubstitution(vocab)
        twin: dict[int, Perturbation] = {}
        for k in range(len(cands)):  # the main candidates only: the list grows below
            main = cands[k]
            if not main.valid:
                continue
            twins: list[Perturbation | None] = []
            for pert in (main.chosen, main.rejected):
                if pert is not None and id(pert) not in twin:
                    twin[id(pert)] = rnd.perturb_like(pert, item_rng(seed, "random", *key_of[id(pert)]))
                twins.append(None if pert is None else twin[id(pert)])
            if all(p.ok for p in twins if p is not None):
                cands.append(Candidate(main.comparison, baseline_name(main.generator), main.attribute, main.target,
                                       main.directions, main.variant, twins[0], twins[1], valid=True, twin_of=k))

    # ---- 4. score everything once per RM
    uniq: dict[tuple[str, str], int] = {}

    def slot(prompt: str, text: str) -> int:
        return uniq.setdefault((prompt, text), len(uniq))

    orig_slots = [(slot(cmp.prompt, cmp.chosen), slot(cmp.prompt, cmp.rejected)) for cmp in comparisons]
    cand_slots = []
    for cand in cands:
        comp = comparisons[cand.comparison]
        ch, rj = cand.texts(comp)
        cand_slots.append((slot(comp.prompt, ch), slot(comp.prompt, rj)))
    keys = list(uniq)
    original_margins, margins = {}, {}
    for name, rm in rm_dict.items():
        scores = np.empty(len(keys), dtype=np.float64)
        # In (prompt, text) order, so a chunk holds whole families of perturbations: an RM that runs a
        # shared beginning once (the log-ratio IRM) finds the original beside its perturbations.
        order = sorted(range(len(keys)), key=keys.__getitem__)
        for s in range(0, len(order), score_batch):
            idx = order[s : s + score_batch]
            chunk = [keys[k] for k in idx]
            try:
                r = np.asarray(rm.score([k[0] for k in chunk], [k[1] for k in chunk]), dtype=np.float64)
            except Exception as e:
                raise RuntimeError(f"Reward model {name!r} failed to score {len(chunk)} texts: {type(e).__name__}: {e}") from e
            if r.shape != (len(chunk),):
                raise ValueError(f"Reward model {name!r} returned shape {r.shape} for {len(chunk)} texts; "
                                 "score must return float64[n].")
            scores[idx] = r
        if not np.all(np.isfinite(scores)):
            bad_i = int(np.flatnonzero(~np.isfinite(scores))[0])
            raise FloatingPointError(f"Reward model {name!r} returned a non-finite reward, e.g. for "
                                     f"{keys[bad_i][1][:80]!r}; a NaN would make every flip test meaningless.")
        oa, ob = np.array(orig_slots, dtype=np.int64).reshape(-1, 2).T
        original_margins[name] = tie_margins(scores[oa], scores[ob], rtol=tie_rtol)
        ca, cb = np.array(cand_slots, dtype=np.int64).reshape(-1, 2).T
        margins[name] = tie_margins(scores[ca], scores[cb], rtol=tie_rtol)
        log.info("contrastive: scored %d texts with %s", len(keys), name)

    # ---- 5. distances
    for cand in cands:
        cand.syntactic = float(np.mean([normalized_edit_distance(p.original, p.text) for p in cand.sides()]))
    twin_vectors: dict[int, np.ndarray] = {}
    emb = MiniLMEmbedder() if embedder == "minilm" else embedder
    if emb is not None:
        # Embedding every candidate costs minutes on a CPU; CFs (under any RM) are all embedded, the
        # other valid candidates (mostly SFs) through a fixed random subsample per generator.
        is_cf = np.zeros(len(cands), dtype=bool)
        comp_idx = np.array([c.comparison for c in cands], dtype=np.int64)
        valid = np.array([c.valid for c in cands], dtype=bool)
        for name in rm_dict:
            is_cf |= valid & (original_margins[name][comp_idx] * margins[name] < 0)
        chosen_k = set(np.flatnonzero(is_cf).tolist())
        for gname in {c.generator for c in cands}:
            rest = [k for k, c in enumerate(cands) if c.generator == gname and c.valid and k not in chosen_k]
            if len(rest) > semantic_sample:
                rest = item_rng(seed, "semantic", gname).choice(rest, semantic_sample, replace=False).tolist()
            chosen_k.update(rest)
        todo = sorted(chosen_k)
        texts = sorted({t for cmp in comparisons for t in (cmp.chosen, cmp.rejected)}
                       | {p.text for k in todo for p in cands[k].sides()})
        vecs = np.asarray(emb.encode(texts), dtype=np.float64)
        vecs /= np.clip(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12, None)
        row = {t: vecs[i] for i, t in enumerate(texts)}
        for k in todo:
            cand = cands[k]
            cand.semantic = float(np.mean([1.0 - float(row[p.original] @ row[p.text]) for p in cand.sides()]))
            ch, rj = cand.texts(comparisons[cand.comparison])
            twin_vectors[k] = np.concatenate([row[ch], row[rj]]) / math.sqrt(2)
        log.info("contrastive: embedded %d texts for semantic distances", len(texts))

    parse_logs = {g.name: g.parse_log.to_dict() for g in gens if hasattr(g, "parse_log")}
    settings = {"attributes": [a.name for a in attrs], "generators": names, "targets": list(targets),
                "n_variants": n_variants, "random_baseline": random_baseline, "limits": limits, "seed": seed,
                "n_bootstrap": n_bootstrap, "n_examples": n_examples,
                "embedder": None if emb is None else getattr(emb, "name", type(emb).__name__),
                "syntactic_distance": "word-level Levenshtein / longer length",
                "semantic_distance": "1 - cosine" if emb is not None else None,
                "semantic_sample": semantic_sample if emb is not None else None,
                "n_texts_scored": len(keys), "n_candidates": len(cands), "tie_rtol": tie_rtol, "tie_atol": TIE_ATOL,
                "random_vocabulary": vocab_info if random_baseline else None,
                "fluency_model": fluency_info.get("model"), "max_perplexity_ratio": max_perplexity_ratio}
    return ContrastiveResult(
        comparisons=comparisons, rm_names=list(rm_dict), attributes=[a.name for a in attrs], generators=names,
        candidates=cands, original_margins=original_margins, margins=margins, n_by_generator=n_by_gen,
        validity=validity, settings=settings, parse_logs=parse_logs, fluency=fluency_info, twin_vectors=twin_vectors,
    )


def _moved(a: Attribute, p: Perturbation, d: int, attr_score) -> bool | None:
    """Did ``p`` move attribute ``a`` in direction ``d`` by the attribute's own scorer (None: no scorer)."""
    if a.scorer is None:
        return None
    s0, s1 = attr_score(a, p.original), attr_score(a, p.text)
    return (s1 - s0) * d > 0
