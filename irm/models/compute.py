"""How a loaded model computes: float32 CPU products through oneDNN, mixed precision of the
transformer blocks, running the HF modules without the TransformerBridge's wrappers, and
log-probabilities of target tokens. Everything here acts on a model already loaded
(:mod:`irm.models.loading`)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from typing import TYPE_CHECKING

import torch

from irm.core.log import get_logger

if TYPE_CHECKING:
    from irm.models.loading import LoadedModel

__all__ = ["torch_dtype", "dtype_name", "OneDNNLinear", "use_onednn_linear", "onednn_linear_available",
           "token_logprobs", "set_compute_dtype", "compute_dtype", "float32_compute", "shared_pass_check",
           "unwrapped", "bridge_original"]

log = get_logger(__name__)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; valid: {sorted(_DTYPES)}.")
    return _DTYPES[dtype]



def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

# ----------------------------------------------------------------------------------------------
# float32 matrix products of CPU inference through oneDNN
ENV_ONEDNN = "IRM_ONEDNN_LINEAR"
_ONEDNN_OK: bool | None = None  # None: not checked yet in this process


def onednn_linear_available() -> bool:
    """Whether :class:`OneDNNLinear` takes its fast path in this process: an x86-64 CPU build of torch
    with oneDNN, ``IRM_ONEDNN_LINEAR`` not ``0``, and a check at first use that the oneDNN product
    equals ``torch.nn.functional.linear`` to float rounding (else a warning, and every product stays
    with the default BLAS)."""
    global _ONEDNN_OK
    if os.environ.get(ENV_ONEDNN, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if _ONEDNN_OK is None:
        import platform

        ok = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
              and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
        if ok:
            try:
                g = torch.Generator().manual_seed(0)
                x, w, b = (torch.randn(*s, generator=g) for s in ((2, 5, 48), (40, 48), (40,)))
                with torch.no_grad():
                    got = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
                    want = torch.nn.functional.linear(x, w, b)
                ok = got.shape == want.shape and bool(torch.allclose(got, want, rtol=1e-5, atol=1e-5))
                if not ok:
                    log.warning("oneDNN's linear differs from torch's here; matrix products stay with the "
                                "default BLAS.")
            except Exception as e:  # noqa: BLE001 - any failure: the default path
                log.warning("oneDNN's linear is unusable here (%s: %s); matrix products stay with the "
                            "default BLAS.", type(e).__name__, e)
                ok = False
        _ONEDNN_OK = ok
    return _ONEDNN_OK


class OneDNNLinear(torch.nn.Linear):
    """A ``torch.nn.Linear`` whose float32 CPU inference runs through oneDNN instead of the default BLAS.

    torch's CPU wheels compute ``linear`` with MKL, which on AMD processors (such as the EPYC of our
    benchmarks) picks a slower code path; oneDNN, also inside every x86 torch build, generates its
    kernels for the CPU's instruction set whoever made it. At the shapes of a small LM (SmolLM2's
    576 x 1536 products, its 49,152-token unembedding) oneDNN computes the same float32 products
    1.15-1.65x faster on the 2-core EPYC of our benchmarks (``benchmarks/bench_linear.py``). The result
    is the same product, summed in another order: it agrees with ``F.linear`` to float rounding
    (about 1e-6 relative).

    The fast path is taken only for float32 inputs and weights on a CPU, without autograd (no gradient
    is needed: ``torch.no_grad``, or nothing requires one) and outside ``torch.autocast`` (mixed
    precision keeps its own dispatch); anything else (training, GPUs, other dtypes) is plain
    ``F.linear``. The module is a ``torch.nn.Linear`` in every other respect (same parameters, same
    ``state_dict``); :func:`use_onednn_linear` installs and removes it.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (input.dtype == torch.float32 and w.dtype == torch.float32 and input.device.type == "cpu"
                and w.device.type == "cpu" and input.dim() >= 2 and input.numel()
                and not (torch.is_grad_enabled() and (input.requires_grad or w.requires_grad))
                and not torch.is_autocast_enabled("cpu") and _ONEDNN_OK
                and type(input) is torch.Tensor and w.layout == torch.strided):
            return torch.ops.mkldnn._linear_pointwise(input, w, self.bias, "none", [], "")
        return torch.nn.functional.linear(input, w, self.bias)


def use_onednn_linear(hf_model: torch.nn.Module, enabled: bool = True) -> int:
    """Make every plain ``torch.nn.Linear`` of ``hf_model`` an :class:`OneDNNLinear` (``enabled``), or
    turn them back into ``torch.nn.Linear``. The modules stay the same objects with the same
    parameters (only their class changes), so hooks, bridges and references to them keep working.
    Returns how many modules changed; with ``enabled`` and oneDNN unavailable
    (:func:`onednn_linear_available`), none. :func:`load_model` calls it for models on a CPU."""
    if enabled and not onednn_linear_available():
        return 0
    src, dst = (torch.nn.Linear, OneDNNLinear) if enabled else (OneDNNLinear, torch.nn.Linear)
    n = 0
    for mod in hf_model.modules():
        if type(mod) is src:
            mod.__class__ = dst
            n += 1
    return n


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[i, targets[i]]`` for logits ``[n, vocab]`` and targets ``[n]``: ``[n]``.

    Through ``log_softmax`` (one fused, vectorised kernel) rather than ``logits[t] - logsumexp(logits)``:
    on a CPU, ``logsumexp`` over a 49,152-token vocabulary makes several passes and temporaries and took
    1.4-2x as long (``benchmarks/bench_logprobs.py``). Equal to float rounding."""
    return torch.log_softmax(logits, -1).gather(-1, targets.to(logits.device)[:, None])[:, 0]


def _decoder_layers(hf_model) -> list[torch.nn.Module]:
    """The transformer blocks: the first ``ModuleList`` of ``num_hidden_layers`` modules in the model body
    (the HF blocks themselves where a TransformerBridge has wrapped them)."""
    n = int(hf_model.config.num_hidden_layers)
    for mod in hf_model.base_model.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return [b if getattr(b, "original_component", None) is None else b.original_component for b in mod]
    raise ValueError(f"Cannot find the {n} transformer blocks of {type(hf_model).__name__} (no ModuleList of "
                     "that length in its body); compute_dtype needs them.")


def set_compute_dtype(model: LoadedModel, compute_dtype: str | torch.dtype | None) -> None:
    """Run ``model``'s transformer blocks under ``torch.autocast(compute_dtype)``; float32 or None: off.

    Mixed precision for inference: the weights, the residual stream between blocks, the embedding, the
    final norm and the unembedding (so every log-probability's softmax) stay in the weights' float32;
    inside a block, matrix products and attention run in ``compute_dtype``. On a CPU with AVX-512 BF16
    or AMX, or a GPU, bfloat16 makes matrix products 2-3x faster (whole forward passes of SmolLM2 on a
    2-core CPU: 1.4-1.9x). Results agree with float32 to about bfloat16's precision: log-probabilities
    to about 0.02 nats, but small differences, such as tuned - base activations, lose signal. Hooks
    still see every activation (those the blocks compute in ``compute_dtype`` come out in it). Applies
    to every forward pass, the bridge's included; do not train a model in this state. The setting is
    part of the model's identity, so activation stores and LLM reply caches made in float32 are not
    mixed with mixed-precision ones.
    """
    hf = model.hf_model
    dt = None if compute_dtype is None else torch_dtype(compute_dtype)
    if dt is not None and hf.dtype != torch.float32:
        raise ValueError(f"compute_dtype={dtype_name(dt)} needs float32 weights, but {model.identity.spec} is "
                         f"loaded in {dtype_name(hf.dtype)}, which it computes in already; leave compute_dtype "
                         "unset, or load the weights in float32.")
    if dt == torch.float32:
        dt = None
    for layer in _decoder_layers(hf):
        # Instance attributes, set in __dict__ directly: the block's class stays as it is.
        if "_irm_plain_forward" in layer.__dict__:  # undo an earlier setting
            plain = layer.__dict__.pop("_irm_plain_forward")
            if plain is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.__dict__["forward"] = plain
        if dt is None:
            continue
        plain = layer.forward

        @functools.wraps(plain)
        def mixed(*args, _plain=plain, _layer=layer, **kwargs):
            if hf.__dict__.get("_irm_exact"):  # inside float32_compute
                return _plain(*args, **kwargs)
            dev = next(_layer.parameters()).device.type
            with torch.autocast(device_type=dev, dtype=dt):
                return _plain(*args, **kwargs)

        layer.__dict__["_irm_plain_forward"] = layer.__dict__.get("forward")  # None: the class's forward
        layer.__dict__["forward"] = mixed
    hf._irm_compute_dtype = dt
    model.identity = dataclasses.replace(model.identity, compute_dtype=None if dt is None else dtype_name(dt))


def compute_dtype(hf_model) -> torch.dtype:
    """The dtype ``hf_model``'s blocks compute in: its :func:`set_compute_dtype` setting (unless inside
    :func:`float32_compute`), else its weights'."""
    if hf_model.__dict__.get("_irm_exact"):
        return hf_model.dtype
    return getattr(hf_model, "_irm_compute_dtype", None) or hf_model.dtype


@contextlib.contextmanager
def float32_compute(hf_model):
    """Inside, a model set to mixed precision (:func:`set_compute_dtype`) computes in its float32 weights.

    The shared-prefix checks run in it: whether a model handles a key/value cache, positions and masks
    correctly does not depend on the precision, and in float32 the check can be exact (to 1e-3) where
    bfloat16 rounding alone would move single log-probabilities by tenths of a nat.
    """
    prev = hf_model.__dict__.get("_irm_exact", False)
    hf_model.__dict__["_irm_exact"] = True
    try:
        yield
    finally:
        hf_model.__dict__["_irm_exact"] = prev


def shared_pass_check(got, want, hf_model, *, half: float = 5e-2, relative: bool = False) -> tuple[bool, float]:
    """Whether values computed through a shared key/value cache (``got``) reproduce a plain forward pass
    (``want``): the largest absolute difference (``relative``: over the largest ``|want|``) must be at
    most 1e-3 in float32, ``half`` for half-precision weights. Returns (ok, error). A model in mixed
    precision is checked inside :func:`float32_compute`, so in float32.
    """
    g = torch.as_tensor(got, dtype=torch.float64).flatten()
    w = torch.as_tensor(want, dtype=torch.float64).flatten()
    if not g.numel():
        return True, 0.0
    err = float((g - w).abs().max()) / (max(float(w.abs().max()), 1e-12) if relative else 1.0)
    return err <= (1e-3 if compute_dtype(hf_model) == torch.float32 else half), err



_UNWRAP_LOCK = threading.Lock()


def bridge_original(module: torch.nn.Module) -> torch.nn.Module | None:
    """The HF module a TransformerBridge component wraps (None for anything else)."""
    if "_original_component" not in module._modules:
        return None
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    return module._modules["_original_component"] if isinstance(module, GeneralizedComponent) else None


@contextlib.contextmanager
def unwrapped(hf_model):
    """Inside, ``hf_model`` runs its own modules, not the :class:`TransformerBridge`'s wrappers.

    Booting a bridge puts a wrapper (hook points, argument filtering, its own attention) around every
    module of the HF model, in place. Work that needs no hook (generation, log-probabilities, KL)
    pays for them: whole forward passes of SmolLM2 on a CPU thread take about 5% longer, single
    generation steps 15-30% longer. Inside this context every wrapper is swapped for the module it
    wraps, in the same place of the module tree, and put back on exit (also after an error). The
    parameters are the same objects, so the results are those of the plain HF model (the bridge's
    attention agrees with HF's to float rounding, about 1e-5 relative), and a model set to mixed
    precision stays in it. Hooks on the bridge do not fire inside. Re-entrant and thread-safe per model;
    a model no bridge has wrapped is left as it is.
    """
    with _UNWRAP_LOCK:
        depth = hf_model.__dict__.get("_irm_unwrapped", 0)
        hf_model.__dict__["_irm_unwrapped"] = depth + 1
        if depth == 0:
            swaps: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
            stack = [hf_model]
            while stack:
                mod = stack.pop()
                for name, child in list(mod._modules.items()):
                    if child is None:
                        continue
                    orig = bridge_original(child)
                    while orig is not None:  # a wrapper of a wrapper: down to the HF module
                        swaps.append((mod, name, child))
                        mod._modules[name] = child = orig
                        orig = bridge_original(child)
                    stack.append(child)
            hf_model.__dict__["_irm_unwrap_swaps"] = swaps
    try:
        yield hf_model
    finally:
        with _UNWRAP_LOCK:  # the last one out puts the wrappers back
            hf_model.__dict__["_irm_unwrapped"] -= 1
            if hf_model.__dict__["_irm_unwrapped"] == 0:
                for mod, name, child in reversed(hf_model.__dict__.pop("_irm_unwrap_swaps")):
                    mod._modules[name] = child
