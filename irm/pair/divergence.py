"""Where did tuning change the model? Per-layer parameter and activation divergence of a base/tuned pair.

- **Parameter divergence** (the layer choice of "Beyond Training Objectives"): for block ``l``,
  ``param_abs = sum over the block's tensors of ||theta_base - theta_tuned||_F`` and
  ``param_rel = param_abs / sum over the same tensors of ||theta_base||_F``.
- **Activation divergence** on a dataset: the residual stream after each block
  (``blocks.{l}.hook_resid_post``), base vs tuned on the same inputs, over real (non-padding) tokens:
  ``act_rel_l2 = mean_token ||h_tuned - h_base|| / ||h_base||`` and
  ``act_cosine = mean_token (1 - cos(h_base, h_tuned))``.

Activations are read with forward hooks on the HF decoder blocks rather than ``output_hidden_states``,
because many HF models return the *final-norm* output as the last hidden state, which is not the last
block's resid_post.

>>> div = layer_divergence(pair, held_out_texts, top_k=5, run_dir=Path("runs/x"))
>>> div["top_k"], div["plot"]
([5, 4, 3, 2, 1], 'runs/x/layer_divergence.png')
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn

from irm.core.constants import DEFAULT_HOOK_TEMPLATE
from irm.core.log import get_logger, progress
from irm.core.threads import ModelThreads
from irm.models import unwrapped

__all__ = [
    "block_modules",
    "parameter_divergence",
    "activation_divergence",
    "layer_divergence",
    "RANK_BY",
    "DIVERGENCE_JSON",
    "DIVERGENCE_PNG",
]

log = get_logger(__name__)

DIVERGENCE_JSON = "layer_divergence.json"
DIVERGENCE_PNG = "layer_divergence.png"
RANK_BY = ("param_abs", "param_rel", "act_rel_l2", "act_cosine")
# Names HF architectures give their list of decoder blocks (Llama/NeoX: layers, GPT-2/Neo: h).
_BLOCK_LIST_NAMES = ("layers", "h", "blocks", "layer")


def block_modules(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The HF model's decoder blocks in order, and the dotted name of their ``ModuleList``.

    >>> prefix, blocks = block_modules(hf_model)   # ("model.layers", [LlamaDecoderLayer, ...])
    """
    n = int(model.config.num_hidden_layers)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n and name.rsplit(".", 1)[-1] in _BLOCK_LIST_NAMES]
    if len(found) != 1:
        raise ValueError(
            f"Could not identify the {n} decoder blocks of {type(model).__name__}: found "
            f"{[name for name, _ in found] or 'no'} ModuleList(s) of length {n} named one of {_BLOCK_LIST_NAMES}. "
            "Layer divergence supports decoder-only HF models whose blocks form one such list."
        )
    name, mods = found[0]
    return name, list(mods)


def _check_pair_params(base_params: dict[str, Tensor], tuned_params: dict[str, Tensor]) -> None:
    from irm.models import ModelPairMismatch

    missing = sorted(set(base_params) ^ set(tuned_params))
    shapes = [k for k in base_params if k in tuned_params and base_params[k].shape != tuned_params[k].shape]
    if missing or shapes:
        raise ModelPairMismatch(
            f"Base and tuned parameters do not line up: {len(missing)} names only in one model "
            f"(e.g. {missing[:3]}), {len(shapes)} with different shapes (e.g. {shapes[:3]}). Was the tuned model "
            "saved with save_pretrained from a copy of this base (a merged LoRA, not an adapter)?"
        )


@torch.no_grad()
def parameter_divergence(pair, *, include_other: bool = False) -> list[dict[str, Any]]:
    """Per block: ``{layer, param_abs, param_base_norm, param_rel, n_params, top_tensor}``.

    ``param_abs`` is the sum over the block's tensors of the Frobenius norm of their change,
    ``param_rel`` divides it by the sum of the base tensors' norms, and ``top_tensor`` names the
    tensor (relative to the block) that changed most. With ``include_other`` the tensors outside
    the blocks (embeddings, final norm, unembedding) follow as rows with ``layer: None`` and a
    ``name``. Norms are computed in float64.
    """
    base_m, tuned_m = pair.base.hf_model, pair.tuned.hf_model
    prefix, blocks = block_modules(base_m)
    bp = dict(base_m.named_parameters())
    tp = dict(tuned_m.named_parameters())
    _check_pair_params(bp, tp)
    acc = [{"abs": 0.0, "norm": 0.0, "n": 0, "top": ("", -1.0)} for _ in blocks]
    other = []
    for name, pb in bp.items():
        b = pb.detach().double()
        d = float(torch.linalg.vector_norm(tp[name].detach().to(b.device).double() - b))
        nb = float(torch.linalg.vector_norm(b))
        head = prefix + "."
        if name.startswith(head):
            idx_s, _, rest = name[len(head):].partition(".")
            a = acc[int(idx_s)]
            a["abs"] += d
            a["norm"] += nb
            a["n"] += b.numel()
            if d > a["top"][1]:
                a["top"] = (rest, d)
        else:
            other.append({"layer": None, "name": name, "param_abs": d, "param_base_norm": nb,
                          "param_rel": d / nb if nb > 0 else None, "n_params": b.numel()})
    rows = [
        {"layer": i, "param_abs": a["abs"], "param_base_norm": a["norm"],
         "param_rel": a["abs"] / a["norm"] if a["norm"] > 0 else None, "n_params": a["n"], "top_tensor": a["top"][0]}
        for i, a in enumerate(acc)
    ]
    return rows + other if include_other else rows


def _resid_post_hooks(model: nn.Module, store: list[Tensor | None]):
    _, blocks = block_modules(model)

    def make(i: int):
        def hook(_module, _inputs, output):
            # Decoder blocks return a tensor or a tuple whose first item is the residual stream.
            store[i] = (output[0] if isinstance(output, tuple) else output).detach()
        return hook

    return [blk.register_forward_hook(make(i)) for i, blk in enumerate(blocks)]


@torch.no_grad()
def activation_divergence(
    pair, texts: Sequence[str], batch_size: int = 8, max_length: int = 64
) -> list[dict[str, Any]]:
    """Per block: ``{layer, hook, act_rel_l2, act_cosine, n_tokens}`` on ``texts``, real tokens only.

    Both models read the same token ids (the base tokenizer; a pair shares its vocabulary), right-padded
    so positions need no correction, truncated to ``max_length`` tokens. ``act_rel_l2`` is the mean over
    tokens of ``||h_tuned - h_base|| / ||h_base||``; ``act_cosine`` the mean of ``1 - cos``. A token's
    ratio is skipped where ``||h_base|| == 0`` (never in practice).
    """
    texts = list(texts)
    if isinstance(texts, str) or not texts:
        raise ValueError("activation_divergence needs a non-empty list of texts (e.g. held-out prompts).")
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size ({batch_size}) and max_length ({max_length}) must be >= 1.")
    base_m, tuned_m = pair.base.hf_model, pair.tuned.hf_model
    tok = pair.base.tokenizer
    n_layers = pair.base.n_layers
    sums = np.zeros((n_layers, 2), dtype=np.float64)  # rel_l2, cosine distance
    counts = np.zeros(n_layers, dtype=np.int64)
    store_b: list[Tensor | None] = [None] * n_layers
    store_t: list[Tensor | None] = [None] * n_layers
    modes = (base_m.training, tuned_m.training)
    base_m.eval(), tuned_m.eval()
    # The HF blocks themselves (no TransformerBridge wrappers), both models at once on a CPU.
    with unwrapped(base_m), unwrapped(tuned_m), ModelThreads([base_m, tuned_m]) as side_by_side:
        handles = _resid_post_hooks(base_m, store_b) + _resid_post_hooks(tuned_m, store_t)
        try:
            for start in progress(range(0, len(texts), batch_size), desc="activation divergence", unit="batch"):
                enc = tok(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True,
                          max_length=max_length, padding_side="right")
                mask = enc["attention_mask"].bool()
                enc_b = enc.to(next(base_m.parameters()).device)
                enc_t = {k: v.to(next(tuned_m.parameters()).device) for k, v in enc_b.items()}
                side_by_side.map([lambda: base_m.base_model(**enc_b), lambda: tuned_m.base_model(**enc_t)])  # noqa: B023
                for layer in range(n_layers):
                    hb, ht = store_b[layer], store_t[layer]
                    rel, cos = _token_divergence(hb[mask.to(hb.device)], ht.to(hb.device)[mask.to(hb.device)])
                    sums[layer] += (float(rel.sum()), float(cos.sum()))
                    counts[layer] += len(rel)
        finally:
            for h in handles:
                h.remove()
            base_m.train(modes[0])
            tuned_m.train(modes[1])
    return [
        {"layer": i, "hook": DEFAULT_HOOK_TEMPLATE.format(layer=i),
         "act_rel_l2": float(sums[i, 0] / counts[i]) if counts[i] else None,
         "act_cosine": float(sums[i, 1] / counts[i]) if counts[i] else None, "n_tokens": int(counts[i])}
        for i in range(n_layers)
    ]


def _token_divergence(
    hb: Float[Tensor, "tokens d_model"], ht: Float[Tensor, "tokens d_model"]
) -> tuple[Float[Tensor, " tokens"], Float[Tensor, " tokens"]]:
    hb, ht = hb.double(), ht.double()
    nb = torch.linalg.vector_norm(hb, dim=-1)
    ok = nb > 0
    rel = torch.linalg.vector_norm(ht - hb, dim=-1)[ok] / nb[ok]
    # Rounding can put 1 - cos a hair below 0 for identical vectors; a distance is never negative.
    cos = (1.0 - torch.nn.functional.cosine_similarity(hb[ok], ht[ok], dim=-1)).clamp_min(0.0)
    return rel, cos


def layer_divergence(
    pair,
    texts: Sequence[str] | None,
    top_k: int = 5,
    run_dir: str | Path | None = None,
    *,
    rank_by: str = "param_abs",
    batch_size: int = 8,
    max_length: int = 64,
) -> dict[str, Any]:
    """Parameter and (with ``texts``) activation divergence per layer, layers ranked, top-k picked.

    Returns (JSON-serialisable)::

        layers:  [{layer, param_abs, param_base_norm, param_rel, n_params, top_tensor,
                   hook, act_rel_l2, act_cosine, n_tokens}, ...]   one per block, in order
        other:   [{name, param_abs, param_rel, ...}]   tensors outside the blocks (embeddings, head)
        rank_by: the criterion; ranking: all layers, most diverged first; top_k: the first ``top_k``
        rankings: {criterion: ranking} for every available criterion
        plot:    path of the PNG (``run_dir/layer_divergence.png``) or None without ``run_dir``

    ``rank_by`` is ``param_abs`` (the paper's criterion, default), ``param_rel``, ``act_rel_l2`` or
    ``act_cosine`` (the last two need ``texts``).

    >>> div = layer_divergence(pair, held_out, top_k=3)
    >>> div["top_k"]   # e.g. [29, 28, 27]
    """
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by {rank_by!r} is not one of {RANK_BY}.")
    if rank_by.startswith("act_") and not texts:
        raise ValueError(f"rank_by={rank_by!r} ranks by activations, so texts must be given (e.g. held-out prompts).")
    n_layers = pair.base.n_layers
    if not 1 <= top_k <= n_layers:
        raise ValueError(f"top_k must be between 1 and the number of layers ({n_layers}), got {top_k}.")
    params = parameter_divergence(pair, include_other=True)
    rows = [dict(r) for r in params if r["layer"] is not None]
    other = [r for r in params if r["layer"] is None]
    if texts:
        for row, act in zip(rows, activation_divergence(pair, texts, batch_size=batch_size, max_length=max_length)):
            row.update({k: v for k, v in act.items() if k != "layer"})
    crits = [c for c in RANK_BY if all(r.get(c) is not None for r in rows)]
    # Ties (e.g. an unchanged pair) keep layer order, so the ranking is deterministic.
    rankings = {c: [r["layer"] for r in sorted(rows, key=lambda r: (-r[c], r["layer"]))] for c in crits}
    result = {
        "layers": rows,
        "other": other,
        "rank_by": rank_by,
        "ranking": rankings[rank_by],
        "top_k": rankings[rank_by][:top_k],
        "rankings": rankings,
        "n_texts": len(texts) if texts else 0,
        "plot": None,
    }
    if run_dir is not None:
        rd = Path(run_dir)
        rd.mkdir(parents=True, exist_ok=True)
        result["plot"] = str(plot_layer_divergence(result, rd / DIVERGENCE_PNG))
        tmp = rd / (DIVERGENCE_JSON + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(rd / DIVERGENCE_JSON)
    log.info("Layer divergence: top-%d by %s = %s", top_k, rank_by, result["top_k"])
    return result


def plot_layer_divergence(result: dict[str, Any], path: str | Path) -> Path:
    """Bar charts of parameter divergence (absolute, relative) and lines of activation divergence;
    the top-k layers are drawn in a second colour."""
    # The object-oriented Agg API leaves pyplot's global state (and any interactive backend) alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result["layers"]
    layers = [r["layer"] for r in rows]
    top = set(result["top_k"])
    colours = ["tab:red" if layer in top else "tab:blue" for layer in layers]
    has_act = all(r.get("act_rel_l2") is not None for r in rows)
    fig = Figure(figsize=(4.2 * (3 if has_act else 2), 3.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if has_act else 2)
    axes[0].bar(layers, [r["param_abs"] for r in rows], color=colours)
    axes[0].set(title="parameters: sum ||Δθ||_F", xlabel="layer")
    axes[1].bar(layers, [r["param_rel"] or 0.0 for r in rows], color=colours)
    axes[1].set(title="parameters: relative to ||θ_base||", xlabel="layer")
    if has_act:
        ax = axes[2]
        ax.plot(layers, [r["act_rel_l2"] for r in rows], "o-", label="relative L2")
        ax.plot(layers, [r["act_cosine"] for r in rows], "s--", label="cosine distance")
        for layer in top:
            ax.axvline(layer, color="tab:red", alpha=0.15, lw=6)
        ax.set(title="resid_post: tuned vs base", xlabel="layer")
        ax.legend(fontsize=8)
    fig.suptitle(f"Layer divergence (top {len(top)} by {result['rank_by']} in red)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
