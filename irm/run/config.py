"""Experiment configs: TOML files parsed into validated, nested dataclasses.

One section per stage. Unknown keys are errors (a typo must not silently fall back to a default),
and every error names the file, the key, what was received and what is valid. The whole config is
saved beside every output (:meth:`ExperimentConfig.to_dict`), secrets never: reward-model or LLM
keys are read from the environment, never from a config.

>>> cfg = load_config("experiments/tiny.toml")
>>> cfg.models.base, cfg.capture.positions
('tiny-llama', 'last')
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from irm.core.constants import POSITION_RULES
from irm.run.registry import import_stages

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "ConfigError",
    "ModelsConfig",
    "RewardConfig",
    "DataConfig",
    "CaptureConfig",
    "TrackingConfig",
    "ExperimentConfig",
    "load_config",
    "config_from_dict",
    "parse_overrides",
    "register_section",
    "SECTIONS",
    "CORE_SECTIONS",
]


class ConfigError(ValueError):
    """A config file or section is malformed."""


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ModelsConfig:
    base: str = _help("Base model: hub name, local dir, .gguf file, 'smollm2-135m-instruct' or 'tiny-llama'.",
                      "smollm2-135m-instruct")
    tuned: str | None = _help("Tuned model, same kinds as base. Empty: made by RLHF-tuning base ([tune]).", None)
    dtype: str = _help("Weights dtype: float32, bfloat16 or float16.", "float32")
    compute_dtype: str = _help("Mixed precision for the analysis stages: 'bfloat16' or 'float16' runs the float32 "
                               "models' transformer blocks under torch.autocast (2-3x faster matrix products on a "
                               "CPU with AVX-512 BF16 or a GPU; log-probabilities move by a few hundredths of a "
                               "nat). 'float32': off. Tuning always trains in dtype.", "float32")
    device: str = _help("'cpu', 'cuda', 'cuda:1' or 'auto'.", "cpu")
    revision: str | None = _help("Hub revision (commit or tag) for hub models.", None)

    def __post_init__(self) -> None:
        if not self.base:
            raise ConfigError("[models] base is empty; name a model (e.g. 'smollm2-135m-instruct').")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"[models] dtype {self.dtype!r} is not one of float32, bfloat16, float16.")
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"[models] compute_dtype {self.compute_dtype!r} is not one of float32, bfloat16, "
                              "float16.")
        if self.compute_dtype != "float32" and self.dtype != "float32":
            raise ConfigError(f"[models] compute_dtype = {self.compute_dtype!r} needs dtype = 'float32' (weights in "
                              f"{self.dtype} compute in {self.dtype} already); set one of them.")


@dataclass
class RewardConfig:
    kind: str = _help("Registered reward-model kind: 'lexicon' or 'classifier'.", "lexicon")
    params: dict[str, Any] = _help("Keyword arguments of that kind (lexicon: path, scale, clip, score_prompt; "
                                   "classifier: path, label, input_format).", factory=dict)

    def __post_init__(self) -> None:
        from irm.rewards.base import reward_model_kinds

        kinds = reward_model_kinds()
        if self.kind not in kinds:
            close = difflib.get_close_matches(self.kind, kinds, n=1)
            raise ConfigError(f"[reward] kind {self.kind!r} is unknown; valid kinds: {kinds}"
                              + (f" (did you mean {close[0]!r}?)" if close else "") + ".")
        for k in self.params:
            if any(s in k.lower() for s in ("key", "token", "secret", "password")):
                raise ConfigError(f"[reward] params.{k}: secrets never go in a config; read them from the "
                                  "environment instead.")

    def build(self):
        from irm.rewards import build_reward_model

        return build_reward_model(self.kind, **self.params)


@dataclass
class DataConfig:
    prompts: str = _help("Prompt source: 'default' (packaged movie-review openings), 'human:CORPORA[:N]' (the "
                         "first N words of the human-rated corpora's train texts, e.g. 'human:movies,amazon,nyt'), "
                         "a .txt/.jsonl/.csv/.parquet file, a save_to_disk directory or a hub dataset name.", "default")
    text_field: str = _help("Column holding the text in JSONL/CSV/hub datasets.", "text")
    split: str = _help("Dataset split for hub datasets.", "train")
    limit: int | None = _help("Use at most this many prompts (None: all).", None)
    test_fraction: float = _help("Share of prompts held out from tuning and probe fitting.", 0.2)

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"[data] test_fraction must be in (0, 1), got {self.test_fraction}.")
        if self.limit is not None and self.limit < 2:
            raise ConfigError(f"[data] limit must be >= 2 (train and test need a prompt each), got {self.limit}.")

    def load(self) -> list[str]:
        from irm.data import load_texts

        return load_texts(self.prompts, text_field=self.text_field, split=self.split, limit=self.limit)


@dataclass
class CaptureConfig:
    hooks: list[str] = _help("TransformerLens hook names; '{layer}' expands over `layers`.",
                             factory=lambda: ["blocks.{layer}.hook_resid_post"])
    layers: list[int] | str = _help("'all' or a list of layer indices (negative counts from the end).", "all")
    positions: str = _help("Position rule: all, last, response_mean or target.", "last")
    batch_size: int = _help("Texts per forward pass.", 16)
    shard_size: int = _help("Texts per shard (the unit of resumption and of memory).", 256)
    max_length: int = _help("Truncate texts to this many tokens.", 128)
    dtype: str = _help("Storage dtype: float32, float16 or bfloat16.", "float32")
    store: str = _help("Store directory; relative paths are inside the run directory.", "store")
    overwrite: bool = _help("Replace an existing store made with other settings.", False)

    def __post_init__(self) -> None:
        if self.positions not in POSITION_RULES:
            raise ConfigError(f"[capture] positions {self.positions!r} is not one of {POSITION_RULES}.")
        if isinstance(self.layers, str) and self.layers != "all":
            raise ConfigError(f"[capture] layers must be 'all' or a list of ints, got {self.layers!r}.")
        if self.batch_size < 1 or self.shard_size < 1 or self.max_length < 2:
            raise ConfigError("[capture] batch_size and shard_size must be >= 1 and max_length >= 2.")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"[capture] dtype {self.dtype!r} is not one of float32, float16, bfloat16.")
        if not self.hooks:
            raise ConfigError("[capture] hooks is empty; the default is ['blocks.{layer}.hook_resid_post'].")


@dataclass
class TrackingConfig:
    mode: str | None = _help("wandb mode: offline (default here), online, or disabled. "
                             "None: $IRM_WANDB_MODE, then $WANDB_MODE, then offline.", None)
    project: str = _help("wandb project.", "irm")
    group: str | None = _help("wandb group.", None)
    tags: list[str] = _help("wandb tags.", factory=list)

    def __post_init__(self) -> None:
        if self.mode not in (None, "offline", "online", "disabled", "off"):
            raise ConfigError(f"[tracking] mode {self.mode!r} is not one of offline, online, disabled.")


@dataclass
class ExperimentConfig:
    name: str = _help("Experiment name: names the run directory and the wandb run.", "default")
    seed: int = _help("Seed for everything random.", 0)
    run_dir: str = _help("Run directory; '{name}' is replaced. Relative to the current directory.", "runs/{name}")
    num_threads: int | None = _help("torch CPU threads (None: torch's default). Small models on a busy CPU "
                                    "run faster on 1.", None)
    models: ModelsConfig = _help("The model pair.", factory=ModelsConfig)
    reward: RewardConfig = _help("The explicit reward model.", factory=RewardConfig)
    data: DataConfig = _help("Prompts.", factory=DataConfig)
    capture: CaptureConfig = _help("Activation capture.", factory=CaptureConfig)
    tracking: TrackingConfig = _help("Weights & Biases.", factory=TrackingConfig)
    # Stages that later modules add register their section type here (see `register_section`).
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": "Sections of other stages."})
    source: str | None = field(default=None, metadata={"help": "The file this config was read from."})

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir.replace("{name}", self.name))

    def section(self, name: str):
        """A registered stage section (e.g. ``cfg.section("tune")``), defaults if the file had none."""
        if name not in self.extra:
            if name not in SECTIONS:
                raise ConfigError(f"No config section {name!r}; known sections: {sorted(SECTIONS)}.")
            self.extra[name] = SECTIONS[name]()
        return self.extra[name]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out = {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in d.items()}
        for k, v in self.extra.items():
            out[k] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
        return out


# Sections of later stages: name -> dataclass. A new stage registers here instead of editing
# ExperimentConfig, so this file does not grow an if/elif chain.
SECTIONS: dict[str, type] = {}


def register_section(name: str, cls: type) -> None:
    SECTIONS[name] = cls


CORE_SECTIONS = {"models": ModelsConfig, "reward": RewardConfig, "data": DataConfig, "capture": CaptureConfig,
         "tracking": TrackingConfig}


def _build(cls: type, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] must be a table, got {type(data).__name__}: {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, fields, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"[{where}] unknown key(s) {', '.join(hints)}; valid keys: {sorted(fields)}.")
    hints_t = get_type_hints(cls)
    for k, v in data.items():
        _check_type(v, hints_t.get(k), f"{where}.{k}")
    try:
        return cls(**data)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{where}] {e}") from e


def _check_type(value: Any, tp: Any, where: str) -> None:
    """Light type check of TOML scalars against the annotation (bool is not an int here)."""
    if tp is None or tp is Any:
        return
    origin = get_origin(tp)
    options = get_args(tp) if origin is not None and str(origin).endswith(("Union", "UnionType")) else None
    if options is None and str(type(tp)).endswith("UnionType'>"):
        options = get_args(tp)
    if options:
        errors = []
        for opt in options:
            try:
                _check_type(value, opt, where)
                return
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"[{where}] got {value!r}; expected {tp}.")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"[{where}] expected nothing")
        return
    base = origin or tp
    if base in (list, dict) and not isinstance(value, base):
        raise ConfigError(f"[{where}] got {value!r}; expected a {base.__name__}.")
    if base is float and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise ConfigError(f"[{where}] got {value!r}; expected a number.")
    if base is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise ConfigError(f"[{where}] got {value!r}; expected an integer.")
    if base is bool and not isinstance(value, bool):
        raise ConfigError(f"[{where}] got {value!r}; expected true or false.")
    if base is str and not isinstance(value, str):
        raise ConfigError(f"[{where}] got {value!r}; expected a string.")


def config_from_dict(data: dict[str, Any], *, source: str | None = None) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from a parsed TOML mapping."""
    import_stages()
    data = dict(data)
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, cls in CORE_SECTIONS.items():
        if key in data:
            kwargs[key] = _build(cls, data.pop(key), key)
    for key in list(data):
        if key in SECTIONS:
            extra[key] = _build(SECTIONS[key], data.pop(key), key)
    top = {f.name for f in dataclasses.fields(ExperimentConfig)} - {"extra", "source", *CORE_SECTIONS}
    unknown = [k for k in data if k not in top]
    if unknown:
        valid = sorted(top | set(CORE_SECTIONS) | set(SECTIONS))
        hints = [f"{k!r}" + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(k, valid, n=1)) else "")
                 for k in unknown]
        raise ConfigError(f"Unknown top-level key(s) or section(s) {', '.join(hints)}; valid: {valid}.")
    for k, v in data.items():
        _check_type(v, get_type_hints(ExperimentConfig).get(k), k)
    return ExperimentConfig(**data, **kwargs, extra=extra, source=source)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a TOML experiment config, or the ``config.json`` a run saved (which reproduces that run).
    ``overrides`` maps dotted keys to values (``{"capture.batch_size": 8}``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path.resolve()} does not exist. Examples are in experiments/; a run's own "
                          "config is runs/NAME/config.json.")
    source = str(path)
    if path.suffix.lower() == ".json":  # a run's saved config (runs/NAME/config.json): reproduces that run
        import json

        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config is a JSON object, got {type(data).__name__}.")
        # Relative paths of the run resolve against the config it was made from.
        source = data.pop("source", None) or source
    else:
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from e
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return config_from_dict(data, source=source)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["capture.batch_size=8", "seed=1"]`` (``--set`` arguments) as ``{dotted key: value}``: values are
    Python literals where they parse as one, else bare strings."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set capture.batch_size=8")
        k, v = item.split("=", 1)
        if v.strip().lower() in ("true", "false"):  # TOML's spelling, as in the config files
            out[k.strip()] = v.strip().lower() == "true"
            continue
        try:
            out[k.strip()] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k.strip()] = v  # a bare string
    return out
