"""Compare two SAE dictionaries (base vs tuned): MMCS, appearing / vanishing / shifting features,
and per-feature activation change on the same inputs.

MMCS, as in "Beyond Training Objectives": the cosine-similarity matrix between the unit decoder
directions of the two dictionaries, a one-to-one (Hungarian) matching that maximises the summed
cosine, and the mean matched cosine. ``mmcs_max_*`` is the other common variant (each feature's best
cosine in the other dictionary, not one-to-one).

- **appeared**: tuned features whose best cosine to any base feature is below ``threshold``;
- **vanished**: base features whose best cosine to any tuned feature is below ``threshold``;
- **shifted**: Hungarian-matched pairs of features that both have a partner above ``threshold``,
  ordered by matched cosine, lowest first (the same feature, moved most).

>>> cmp = compare_dictionaries(decoder_directions(sae_base), decoder_directions(sae_tuned))
>>> cmp.mmcs, cmp.appeared[:5]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["DictionaryComparison", "cosine_matrix", "compare_dictionaries", "activation_change"]


@dataclass
class DictionaryComparison:
    """Result of :func:`compare_dictionaries` (indices are feature ids of each dictionary)."""

    mmcs: float  # mean cosine over the Hungarian matching
    mmcs_max_base: float  # mean over base features of the best cosine to any tuned feature
    mmcs_max_tuned: float  # mean over tuned features of the best cosine to any base feature
    match_base: np.ndarray  # [n_matched] base feature ids
    match_tuned: np.ndarray  # [n_matched] tuned feature ids, paired with match_base
    match_cos: np.ndarray  # [n_matched] cosine of each matched pair
    best_cos_base: np.ndarray  # [d_sae_base] best cosine of each base feature
    best_cos_tuned: np.ndarray  # [d_sae_tuned] best cosine of each tuned feature
    appeared: list[int]  # tuned ids, lowest best cosine first
    vanished: list[int]  # base ids, lowest best cosine first
    shifted: list[tuple[int, int, float]]  # (base id, tuned id, cos), lowest cos first
    threshold: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, k: int = 20) -> dict[str, Any]:
        return {
            "mmcs": self.mmcs, "mmcs_max_base": self.mmcs_max_base, "mmcs_max_tuned": self.mmcs_max_tuned,
            "n_matched": int(len(self.match_cos)), "threshold": self.threshold,
            "n_appeared": len(self.appeared), "n_vanished": len(self.vanished),
            "appeared": [{"tuned": i, "best_cos": float(self.best_cos_tuned[i])} for i in self.appeared[:k]],
            "vanished": [{"base": i, "best_cos": float(self.best_cos_base[i])} for i in self.vanished[:k]],
            "shifted": [{"base": b, "tuned": t, "cos": c} for b, t, c in self.shifted[:k]],
            "matched_cos_quantiles": {str(q): float(np.quantile(self.match_cos, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
            if len(self.match_cos) else {},
            **self.extra,
        }


def cosine_matrix(a: Float[Tensor, "n d"], b: Float[Tensor, "m d"]) -> Float[Tensor, "n m"]:
    """Cosine similarity of every row of ``a`` with every row of ``b``."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"cosine_matrix needs [n, d] and [m, d] with the same d; got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}. Compare dictionaries of the same hook (same d_model).")
    a = a.double() / a.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b.double() / b.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


def compare_dictionaries(
    dec_base: Float[Tensor, "n d"],
    dec_tuned: Float[Tensor, "m d"],
    *,
    threshold: float = 0.5,
    alive_base: np.ndarray | None = None,
    alive_tuned: np.ndarray | None = None,
) -> DictionaryComparison:
    """MMCS and the appear / vanish / shift lists of two dictionaries (decoder rows, any norm).

    ``alive_*``: bool masks; dead features (never active) are left out of everything when given, since
    their decoder rows are whatever initialisation left them.

    >>> D = torch.eye(4)
    >>> compare_dictionaries(D, D[[2, 0, 1, 3]]).mmcs      # a permutation: perfect match
    1.0
    """
    from scipy.optimize import linear_sum_assignment

    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine in [-1, 1], got {threshold}.")
    ids_b = np.arange(len(dec_base)) if alive_base is None else np.flatnonzero(alive_base)
    ids_t = np.arange(len(dec_tuned)) if alive_tuned is None else np.flatnonzero(alive_tuned)
    if len(ids_b) == 0 or len(ids_t) == 0:
        raise ValueError(f"Nothing to compare: {len(ids_b)} base and {len(ids_t)} tuned features (alive ones only).")
    cos = cosine_matrix(dec_base[torch.as_tensor(ids_b)], dec_tuned[torch.as_tensor(ids_t)]).numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    match_cos = cos[rows, cols]
    best_b_sub, best_t_sub = cos.max(1), cos.max(0)
    best_b = np.full(len(dec_base), np.nan)
    best_t = np.full(len(dec_tuned), np.nan)
    best_b[ids_b], best_t[ids_t] = best_b_sub, best_t_sub
    appeared = [int(ids_t[j]) for j in np.argsort(best_t_sub) if best_t_sub[j] < threshold]
    vanished = [int(ids_b[i]) for i in np.argsort(best_b_sub) if best_b_sub[i] < threshold]
    both = (best_b_sub[rows] >= threshold) & (best_t_sub[cols] >= threshold)
    order = np.argsort(match_cos)
    shifted = [(int(ids_b[rows[i]]), int(ids_t[cols[i]]), float(match_cos[i])) for i in order if both[i]]
    return DictionaryComparison(
        mmcs=float(match_cos.mean()), mmcs_max_base=float(best_b_sub.mean()), mmcs_max_tuned=float(best_t_sub.mean()),
        match_base=ids_b[rows], match_tuned=ids_t[cols], match_cos=match_cos, best_cos_base=best_b,
        best_cos_tuned=best_t, appeared=appeared, vanished=vanished, shifted=shifted, threshold=float(threshold),
        extra={"n_base": int(len(ids_b)), "n_tuned": int(len(ids_t))},
    )


def activation_change(
    acts_base: Float[Tensor, "n d_sae_base"],
    acts_tuned: Float[Tensor, "n d_sae_tuned"],
    match_base: np.ndarray,
    match_tuned: np.ndarray,
    *,
    k: int = 20,
) -> dict[str, Any]:
    """How each matched feature's activity changed between base and tuned on the same inputs.

    ``acts_base[r]`` and ``acts_tuned[r]`` must come from the same token (row ``r`` of one store), the
    base SAE on base activations and the tuned SAE on tuned activations. For each matched pair:
    mean activation and firing rate in each model, their changes, and the correlation over rows.
    Returns the pairs whose firing rate changed most (``k`` up, ``k`` down) and summary numbers.
    """
    if len(acts_base) != len(acts_tuned):
        raise ValueError(f"acts_base has {len(acts_base)} rows but acts_tuned {len(acts_tuned)}; they must be "
                         "the same tokens (rows of one store, captured from both models).")
    if len(match_base) != len(match_tuned):
        raise ValueError(f"match_base ({len(match_base)}) and match_tuned ({len(match_tuned)}) differ in length.")
    if len(acts_base) == 0 or len(match_base) == 0:
        return {"n_rows": int(len(acts_base)), "n_pairs": int(len(match_base)), "up": [], "down": []}
    fb = acts_base[:, torch.as_tensor(match_base)].double()
    ft = acts_tuned[:, torch.as_tensor(match_tuned)].double()
    rate_b, rate_t = (fb > 0).double().mean(0), (ft > 0).double().mean(0)
    mean_b, mean_t = fb.mean(0), ft.mean(0)
    cb, ct = fb - mean_b, ft - mean_t
    denom = (cb.norm(dim=0) * ct.norm(dim=0))
    corr = torch.where(denom > 0, (cb * ct).sum(0) / denom.clamp_min(1e-300), torch.full_like(denom, float("nan")))
    d_rate = (rate_t - rate_b).numpy()

    def row(i: int) -> dict[str, Any]:
        return {"base": int(match_base[i]), "tuned": int(match_tuned[i]), "rate_base": float(rate_b[i]),
                "rate_tuned": float(rate_t[i]), "mean_base": float(mean_b[i]), "mean_tuned": float(mean_t[i]),
                "rate_change": float(d_rate[i]), "corr": float(corr[i])}

    order = np.argsort(d_rate)
    corr_np = corr.numpy()
    return {
        "n_rows": int(len(acts_base)), "n_pairs": int(len(match_base)),
        "mean_abs_rate_change": float(np.abs(d_rate).mean()),
        "median_corr": float(np.nanmedian(corr_np)) if np.isfinite(corr_np).any() else None,
        "up": [row(i) for i in order[::-1][:k] if d_rate[i] > 0],
        "down": [row(i) for i in order[:k] if d_rate[i] < 0],
    }
