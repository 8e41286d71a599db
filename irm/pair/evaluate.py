"""Evaluate a base/tuned pair on held-out prompts: reward gain, KL, repetition and sample generations.

Works on any :class:`~irm.models.ModelPair`, whether :func:`irm.pair.tune.tune` made the tuned model or it
was loaded ready-made (``ModelPair.load("EleutherAI/pythia-70m",
"amirabdullah19852020/pythia-70m_utility_reward")``). What it measures:

- **reward**: the explicit RM on base and on tuned generations for the same prompts (the same random
  stream per prompt), mean and std of each, and the effect size ``(mean_tuned - mean_base) / std_base`` with a
  paired bootstrap CI;
- **kl_per_token**: ``KL(tuned || base)`` at every completion position of the tuned samples, computed
  exactly over the vocabulary (not a one-sample estimate), averaged over completion tokens;
- **repetition**: seq-rep-n (share of a completion's n-grams that repeat an earlier n-gram of the same
  completion, over token ids), and corpus **distinct_n**; a tuned model that loops or collapses onto
  a few words is flagged as over-optimised;
- **samples**: base and tuned generations side by side.

>>> pair = ModelPair.load("tiny-llama", "runs/x/tuned")
>>> ev = evaluate_pair(pair, TokenUtilityRM.from_vader(), held_out, run_dir=Path("runs/x"))
>>> ev["reward"]["effect_size"], ev["kl_per_token"]["mean"], ev["repetition"]["flag_over_optimised"]
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from irm.core.constants import BASE, ROLES, TUNED
from irm.core.log import get_logger
from irm.core.threads import ModelThreads, run_side_by_side
from irm.models import unwrapped
from irm.models.generation import GenerationMemo, Generations, generate

__all__ = [
    "completion_kl",
    "seq_rep_n",
    "distinct_n",
    "repetition_report",
    "bootstrap_effect_size",
    "evaluate_pair",
    "evaluation_metrics",
    "EVAL_JSON",
    "EVAL_SAMPLES_JSONL",
    "EVAL_SAMPLES_MD",
]

log = get_logger(__name__)

EVAL_JSON = "evaluation.json"
EVAL_SAMPLES_JSONL = "eval_samples.jsonl"
EVAL_SAMPLES_MD = "eval_samples.md"

# Repetition is "over-optimised" when tuned > max(REP_RATIO * base, base + REP_SLACK): the ratio is the
# criterion, the additive slack keeps a near-zero base repetition from flagging on a single repeat.
REP_N = 2
REP_RATIO = 2.0
REP_SLACK = 0.05
# Diversity collapse: tuned distinct-2 below this share of the base's.
DISTINCT_COLLAPSE = 0.5


# ----------------------------------------------------------------------------------------------
# KL(tuned || base) on tuned samples
def _right_padded(rows: list[list[int]], pad_id: int, device) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    # Right padding keeps every real token at its natural position, so no position_ids are needed
    # and (causal attention) trailing pads cannot affect the real tokens.
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def completion_kl(
    base_model, tuned_model, gens: Generations, *, pad_token_id: int, batch_size: int = 16
) -> list[Float[np.ndarray, " completion"]]:
    """Exact per-token ``KL(tuned || base)`` at each completion position of ``gens``.

    Returns one array per sample, shape ``[len(completion_ids[i])]``: entry ``j`` is
    ``sum_v p_tuned(v | ctx_j) (log p_tuned(v | ctx_j) - log p_base(v | ctx_j))`` where ``ctx_j`` is the
    prompt plus the first ``j`` completion tokens. Logits are used at temperature 1, i.e. the KL of
    the models themselves, not of a sampling setting.
    """
    dev_t = next(tuned_model.parameters()).device
    dev_b = next(base_model.parameters()).device
    out: list[np.ndarray] = []
    # Both models at once on a CPU; no TransformerBridge wrappers (no hook is needed).
    with ModelThreads([tuned_model, base_model]) as side_by_side, unwrapped(tuned_model), unwrapped(base_model):
        for start in range(0, len(gens), batch_size):
            rows = [p + c for p, c in zip(gens.prompt_ids[start : start + batch_size],
                                          gens.completion_ids[start : start + batch_size])]
            ids, mask = _right_padded(rows, pad_token_id, dev_t)
            ids_b, mask_b = ids.to(dev_b), mask.to(dev_b)
            # Position t predicts token t+1: completion token j is predicted at position n_p - 1 + j. Only
            # the positions that predict a completion token are unembedded (not the prompts').
            n_ps = [len(p) for p in gens.prompt_ids[start : start + batch_size]]
            lo = min(n_ps) - 1
            keep = torch.arange(lo, max(len(r) for r in rows) - 1)
            lt, lb = side_by_side.map([
                lambda: _logits_at(tuned_model, ids, mask, keep).float().log_softmax(-1),  # noqa: B023
                lambda: _logits_at(base_model, ids_b, mask_b, keep).float().log_softmax(-1),  # noqa: B023
            ])
            kl = (lt.exp() * (lt - lb.to(dev_t))).sum(-1)  # [batch, kept pos]: KL of the next-token distributions
            for i in range(len(rows)):
                n_p = n_ps[i]
                n_c = len(gens.completion_ids[start + i])
                out.append(kl[i, n_p - 1 - lo : n_p - 1 - lo + n_c].double().cpu().numpy())
    return out


def _logits_at(model, ids: Tensor, mask: Tensor, keep: Tensor) -> Tensor:
    """Logits ``[batch, len(keep), vocab]`` at positions ``keep`` only (HF's ``logits_to_keep``, where the
    model's forward has it; else all positions, then cut)."""
    import inspect

    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=keep.to(ids.device)).logits
    return model(input_ids=ids, attention_mask=mask).logits[:, keep.to(ids.device)]


# ----------------------------------------------------------------------------------------------
# Repetition and diversity
def seq_rep_n(ids: Sequence[int], n: int = REP_N) -> float | None:
    """Share of the n-grams of one sequence that repeat an earlier n-gram of it (Welleck et al. 2019).

    ``1 - |unique n-grams| / |n-grams|``; None when the sequence has no n-gram.

    >>> seq_rep_n([5, 6, 5, 6, 5], n=2)   # (5,6) (6,5) (5,6) (6,5): 2 of 4 repeat
    0.5
    """
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return None
    return 1.0 - len(set(grams)) / len(grams)


def distinct_n(seqs: Sequence[Sequence[int]], n: int) -> float | None:
    """Corpus distinct-n: unique n-grams over all n-grams of all sequences (Li et al. 2016); None if none."""
    grams = [tuple(s[i : i + n]) for s in seqs for i in range(len(s) - n + 1)]
    if not grams:
        return None
    return len(set(grams)) / len(grams)


def _mean_rep(seqs: Sequence[Sequence[int]], n: int) -> float | None:
    vals = [v for v in (seq_rep_n(s, n) for s in seqs) if v is not None]
    return float(np.mean(vals)) if vals else None


def _ratio_ci(base: Sequence[Sequence[int]], tuned: Sequence[Sequence[int]], n: int, *, n_boot: int = 2000,
              seed: int = 0, level: float = 0.95) -> list[float] | None:
    """Percentile-bootstrap CI of mean rep-n(tuned) / mean rep-n(base), samples resampled per model."""
    b = np.array([v for v in (seq_rep_n(x, n) for x in base) if v is not None])
    t = np.array([v for v in (seq_rep_n(x, n) for x in tuned) if v is not None])
    if len(b) < 2 or len(t) < 2:
        return None
    rng = np.random.default_rng(seed)
    mb = b[rng.integers(0, len(b), size=(n_boot, len(b)))].mean(axis=1)
    mt = t[rng.integers(0, len(t), size=(n_boot, len(t)))].mean(axis=1)
    ok = mb > 0
    if ok.mean() < 0.5:  # the base rarely repeats at all: a ratio says nothing
        return None
    alpha = (1 - level) / 2
    ratios = mt[ok] / mb[ok]
    return [float(np.quantile(ratios, alpha)), float(np.quantile(ratios, 1 - alpha))]


def repetition_report(
    base_ids: Sequence[Sequence[int]], tuned_ids: Sequence[Sequence[int]]
) -> tuple[dict[str, Any], dict[str, dict[str, float | None]]]:
    """Repetition (mean seq-rep-2) and corpus distinct-1/2 of base and tuned completions, and the flag.

    The tuned model is flagged as over-optimised when its rep-2 exceeds
    ``max(2 x base, base + 0.05)`` (it loops) or its distinct-2 falls below half the base's (it
    collapses onto a few phrases across samples). Returns ``(repetition, distinct_n)`` as in
    :func:`evaluate_pair`.

    >>> rep, dist = repetition_report([[1, 2, 3, 4]], [[7, 7, 7, 7]])
    >>> rep["flag_over_optimised"]
    True
    """
    content = {BASE: base_ids, TUNED: tuned_ids}
    rep = {role: _mean_rep(content[role], REP_N) for role in ROLES}
    dist = {role: {f"distinct_{n}": distinct_n(content[role], n) for n in (1, 2)} for role in ROLES}
    reasons = []
    rb, rt = rep[BASE], rep[TUNED]
    if rb is not None and rt is not None and rt > max(REP_RATIO * rb, rb + REP_SLACK):
        reasons.append(f"rep-{REP_N} {rt:.3f} > max({REP_RATIO:g} x base {rb:.3f}, base + {REP_SLACK:g})")
    db, dt = dist[BASE]["distinct_2"], dist[TUNED]["distinct_2"]
    if db is not None and dt is not None and dt < DISTINCT_COLLAPSE * db:
        reasons.append(f"distinct-2 {dt:.3f} < {DISTINCT_COLLAPSE:g} x base {db:.3f}")
    repetition = {
        "n": REP_N,
        BASE: rb,
        TUNED: rt,
        "ratio": (rt / rb) if rb and rt is not None else None,
        # The base repeats rarely (rep-2 ~0.01 on 20 tokens), so the ratio is noisy: its CI says how much.
        "ratio_ci": _ratio_ci(base_ids, tuned_ids, REP_N),
        "rep_1": {role: _mean_rep(content[role], 1) for role in ROLES},
        "flag_over_optimised": bool(reasons),
        "reasons": reasons,
    }
    return repetition, dist


# ----------------------------------------------------------------------------------------------
# Statistics
def _effect(base: np.ndarray, tuned: np.ndarray) -> float | None:
    sd = float(np.std(base, ddof=1)) if len(base) > 1 else 0.0
    if not math.isfinite(sd) or sd == 0.0:
        return None  # undefined: the base reward does not vary
    return float((np.mean(tuned) - np.mean(base)) / sd)


def bootstrap_effect_size(
    base: Sequence[float], tuned: Sequence[float], *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float | None, list[float] | None]:
    """Effect size ``(mean(tuned) - mean(base)) / std(base)`` and its paired percentile-bootstrap CI.

    ``base[i]`` and ``tuned[i]`` come from the same prompt, so rows are resampled together. Returns
    ``(effect, [lo, hi])``; ``(None, None)`` when the base rewards do not vary.

    >>> bootstrap_effect_size([0, 1, 0, 1], [1, 2, 1, 2])[0]
    1.732...
    """
    b, t = np.asarray(base, dtype=np.float64), np.asarray(tuned, dtype=np.float64)
    if b.shape != t.shape or b.ndim != 1:
        raise ValueError(f"base and tuned rewards must be 1-d and paired; got shapes {b.shape} and {t.shape}.")
    eff = _effect(b, t)
    if eff is None:
        return None, None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(b), size=(n_boot, len(b)))
    bb, tt = b[idx], t[idx]
    sd = bb.std(axis=1, ddof=1)
    ok = sd > 0
    boots = (tt[ok].mean(axis=1) - bb[ok].mean(axis=1)) / sd[ok]
    alpha = (1 - level) / 2
    return eff, [float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))]


def _bootstrap_mean_ci(x: np.ndarray, *, n_boot: int, seed: int, level: float = 0.95) -> list[float]:
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    alpha = (1 - level) / 2
    return [float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))]


def _stats(x: np.ndarray) -> dict[str, float | int]:
    return {"mean": float(np.mean(x)), "std": float(np.std(x, ddof=1)) if len(x) > 1 else 0.0, "n": int(len(x))}


# ----------------------------------------------------------------------------------------------
def evaluate_pair(
    pair,
    rm: Callable[..., list[float]],
    prompts: Sequence[str],
    *,
    n_samples_per_prompt: int = 1,
    max_new_tokens: int = 20,
    seed: int = 0,
    run_dir: str | Path | None = None,
    batch_size: int = 32,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    n_boot: int = 2000,
    n_show: int = 8,
    memo: GenerationMemo | None = None,
) -> dict[str, Any]:
    """Compare base and tuned generations on ``prompts`` (held-out ones: tuning must not have seen them).

    ``rm`` is any irm RM or trl reward function, ``rm(prompts, completions) -> list[float]``. Sampling
    defaults match :class:`irm.pair.tune.TuneConfig` (top_k 0, top_p 1, temperature 1).

    Returns a JSON-serialisable dict::

        reward:        {base: {mean, std, n}, tuned: {mean, std, n}, effect_size, effect_size_ci: [lo, hi],
                        win_rate}
        kl_per_token:  {mean, ci: [lo, hi], mean_sequence, n_tokens}
        repetition:    {n, base, tuned, ratio, ratio_ci, rep_1, flag_over_optimised, reasons}
        distinct_n:    {base: {distinct_1, distinct_2}, tuned: {...}}
        samples:       [{prompt, base, tuned, reward_base, reward_tuned}]   (the first ``n_show``)
        settings, pair

    With ``run_dir`` it also writes ``evaluation.json``, every sample as ``eval_samples.jsonl`` and a
    side-by-side markdown table ``eval_samples.md`` there.

    >>> ev = evaluate_pair(pair, rm, held_out, n_samples_per_prompt=2)
    >>> print(ev["reward"]["effect_size"], ev["repetition"]["flag_over_optimised"])
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("evaluate_pair got no prompts; pass the held-out prompts (e.g. TuneResult.held_out).")
    gen_kw = dict(max_new_tokens=max_new_tokens, n_samples_per_prompt=n_samples_per_prompt,
                  temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, batch_size=batch_size)
    gens: dict[str, Generations] = {}
    rewards: dict[str, np.ndarray] = {}
    roles = [(role, m) for role, m in pair]
    # Both models generate at the same time on a CPU (irm.core.threads); sampling is per row, so the same.
    done = run_side_by_side([functools.partial(generate, m.hf_model, m.tokenizer, prompts, desc=f"generate ({role})",
                                               memo=memo, **gen_kw) for role, m in roles], [m for _, m in roles])
    for (role, _), g in zip(roles, done, strict=True):
        gens[role] = g
        r = np.asarray(rm(gens[role].prompts, gens[role].completions), dtype=np.float64)
        if r.shape != (len(gens[role]),) or not np.all(np.isfinite(r)):
            raise ValueError(
                f"The reward model returned {r.shape} values (non-finite: {int(np.sum(~np.isfinite(r)))}) "
                f"for {len(gens[role])} completions; it must return one finite float per completion."
            )
        rewards[role] = r

    eff, ci = bootstrap_effect_size(rewards[BASE], rewards[TUNED], n_boot=n_boot, seed=seed)
    diff = rewards[TUNED] - rewards[BASE]
    reward = {
        BASE: _stats(rewards[BASE]),
        TUNED: _stats(rewards[TUNED]),
        "effect_size": eff,
        "effect_size_ci": ci,
        # Ties count half: with a lexicon RM many completions score exactly 0.
        "win_rate": float(np.mean((diff > 0) + 0.5 * (diff == 0))),
    }

    kls = completion_kl(pair.base.hf_model, pair.tuned.hf_model, gens[TUNED],
                        pad_token_id=pair.tuned.tokenizer.pad_token_id, batch_size=batch_size)
    seq_means = np.array([k.mean() for k in kls if len(k)], dtype=np.float64)
    all_tok = np.concatenate([k for k in kls if len(k)]) if len(seq_means) else np.zeros(0)
    kl = {
        # Token-weighted mean over every completion token of every tuned sample.
        "mean": float(all_tok.mean()) if len(all_tok) else None,
        # CI over samples (tokens of one sample are not independent); on the per-sample means.
        "ci": _bootstrap_mean_ci(seq_means, n_boot=n_boot, seed=seed) if len(seq_means) else None,
        "mean_sequence": float(np.mean([k.sum() for k in kls])),
        "n_tokens": int(len(all_tok)),
    }

    repetition, dist = repetition_report(gens[BASE].content_ids(), gens[TUNED].content_ids())

    rows = [
        {"prompt": gens[BASE].prompts[i], BASE: gens[BASE].completions[i], TUNED: gens[TUNED].completions[i],
         "reward_base": float(rewards[BASE][i]), "reward_tuned": float(rewards[TUNED][i])}
        for i in range(len(gens[BASE]))
    ]
    result = {
        "reward": reward,
        "kl_per_token": kl,
        "repetition": repetition,
        "distinct_n": dist,
        "samples": rows[:n_show],
        "settings": {"n_prompts": len(prompts), **gen_kw, "n_boot": n_boot,
                     "rm": getattr(rm, "name", getattr(rm, "__name__", type(rm).__name__))},
        "pair": pair.identities(),
    }
    if run_dir is not None:
        _write_outputs(Path(run_dir), result, rows)
    log.info(
        "Held-out reward: base %.3f +- %.3f, tuned %.3f +- %.3f, effect %s base std; KL/token %.4f; rep-%d %s -> %s",
        reward[BASE]["mean"], reward[BASE]["std"], reward[TUNED]["mean"], reward[TUNED]["std"],
        "n/a" if eff is None else f"{eff:.2f}", kl["mean"] or 0.0, REP_N, _num(repetition[BASE]),
        _num(repetition[TUNED]),
    )
    return result


def _num(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else str(x)


def evaluation_metrics(result: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """Flatten :func:`evaluate_pair`'s scalars into namespaced keys for ``Tracker.log`` (None dropped).

    >>> tracker.log(evaluation_metrics(ev), step=0)   # eval/reward_tuned_mean, eval/kl_per_token, ...
    """
    r, k, rep = result["reward"], result["kl_per_token"], result["repetition"]
    flat = {
        f"{prefix}/reward_base_mean": r[BASE]["mean"],
        f"{prefix}/reward_base_std": r[BASE]["std"],
        f"{prefix}/reward_tuned_mean": r[TUNED]["mean"],
        f"{prefix}/reward_tuned_std": r[TUNED]["std"],
        f"{prefix}/effect_size": r["effect_size"],
        f"{prefix}/win_rate": r["win_rate"],
        f"{prefix}/kl_per_token": k["mean"],
        f"{prefix}/repetition_base": rep[BASE],
        f"{prefix}/repetition_tuned": rep[TUNED],
        f"{prefix}/over_optimised": float(rep["flag_over_optimised"]),
    }
    for role in ROLES:
        for name, v in result["distinct_n"][role].items():
            flat[f"{prefix}/{name}_{role}"] = v
    return {key: float(v) for key, v in flat.items() if v is not None}


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ").strip()


def _write_outputs(run_dir: Path, result: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (EVAL_JSON + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, allow_nan=False))
    tmp.replace(run_dir / EVAL_JSON)
    with (run_dir / EVAL_SAMPLES_JSONL).open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    lines = ["| prompt | base | reward | tuned | reward |", "|---|---|---|---|---|"]
    lines += [
        f"| {_md_cell(r['prompt'])} | {_md_cell(r[BASE])} | {r['reward_base']:.2f} | {_md_cell(r[TUNED])} "
        f"| {r['reward_tuned']:.2f} |"
        for r in rows
    ]
    (run_dir / EVAL_SAMPLES_MD).write_text("\n".join(lines) + "\n", encoding="utf-8")
