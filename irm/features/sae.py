"""Sparse autoencoders with sae-lens, trained on an :class:`~irm.activations.store.ActivationStore`.

sae-lens's :class:`~sae_lens.SAETrainer` never sees a model: it takes a ``DataProvider``, an iterator
of ``[batch, d_in]`` tensors. :func:`store_data_provider` is that iterator over our store (shuffled
through a bounded mixing pool, endless, with the first token of each text left out by default, since
its attention-sink activations are orders of magnitude larger than the rest and would dominate the
reconstruction loss). :func:`train_sae` builds a standard (L1) or TopK training SAE, trains it, and
returns the inference SAE with its held-out metrics:

- ``explained_variance``: ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` on held-out texts;
- ``l0``: mean number of active features per held-out row;
- ``dead_share``: share of features that fire on no row of the store.

SAEs are saved in sae-lens's own format (``cfg.json`` + ``sae_weights.safetensors``), so
``SAE.load_from_disk`` (and :func:`load_sae`) read them back; :func:`load_sae` also resolves
pretrained SAEs of the sae-lens registry (``release``, ``sae_id``), e.g. for pythia-70m-deduped.

>>> store = ActivationStore("runs/x/features/store")
>>> trained = train_sae(store, "tuned", "blocks.3.hook_resid_post", SAETrainConfig(steps=300))
>>> trained.metrics["explained_variance"], trained.metrics["l0"]
>>> sae = load_sae("runs/x/features/saes/tuned-blocks.3.hook_resid_post")
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from irm.activations.store import ActivationStore, StoreError
from irm.core.log import get_logger

__all__ = [
    "ARCHITECTURES",
    "SAETrainConfig",
    "TrainedSAE",
    "store_data_provider",
    "eval_text_mask",
    "train_sae",
    "evaluate_sae",
    "encode_rows",
    "decoder_directions",
    "effective_decoder",
    "save_sae",
    "load_sae",
    "pretrained_sae_ids",
    "SAE_METRICS_FILE",
]

log = get_logger(__name__)

ARCHITECTURES = ("standard", "topk")
NORMALIZATIONS = ("expected_average_only_in", "none")
SAE_METRICS_FILE = "irm_sae_metrics.json"


def _h(text: str, default: Any = None, factory: Any = None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class SAETrainConfig:
    """How to train one SAE (the same settings are used for base and tuned, so they are comparable).

    >>> SAETrainConfig(architecture="topk", k=16, expansion=2.0, steps=500)
    """

    architecture: str = _h("sae-lens architecture: 'standard' (ReLU + L1 penalty, as in the paper) or 'topk'.",
                           "standard")
    expansion: float = _h("Dictionary size as a multiple of d_model (the paper used 1x and 2x).", 1.0)
    l1_coefficient: float = _h("standard: weight of the L1 penalty (on decoder-norm-weighted activations of "
                               "inputs normalised to norm sqrt(d_model)).", 5.0)
    l1_warm_up_fraction: float = _h("standard: share of the steps over which the L1 weight ramps up from 0.", 0.1)
    k: int = _h("topk: active features per row.", 32)
    steps: int = _h("Training steps (batches).", 300)
    batch_size: int = _h("Rows per training batch.", 256)
    lr: float = _h("Adam learning rate.", 1e-3)
    normalize: str = _h("Input normalisation: 'expected_average_only_in' (scale rows to mean norm sqrt(d_model) "
                        "while training; folded into the weights afterwards) or 'none'.",
                        "expected_average_only_in")
    min_pos: int = _h("Leave out token positions below this (1: the first token, an attention sink).", 1)
    eval_fraction: float = _h("Share of texts held out of training for the metrics.", 0.1)
    pool_rows: int = _h("Rows shuffled together by the data provider (memory bound).", 65536)
    device: str = _h("Device of the SAE.", "cpu")

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"sae.architecture {self.architecture!r} is not one of {ARCHITECTURES}.")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"sae.normalize {self.normalize!r} is not one of {NORMALIZATIONS}.")
        if not self.expansion > 0:
            raise ValueError(f"sae.expansion must be > 0 (d_sae = expansion x d_model), got {self.expansion}.")
        if self.steps < 1 or self.batch_size < 1 or self.k < 1 or self.pool_rows < 1:
            raise ValueError(f"sae.steps, batch_size, k and pool_rows must be >= 1; got {self.steps}, "
                             f"{self.batch_size}, {self.k}, {self.pool_rows}.")
        if self.l1_coefficient < 0 or not 0 <= self.l1_warm_up_fraction <= 1 or self.lr <= 0:
            raise ValueError(f"need l1_coefficient >= 0, l1_warm_up_fraction in [0, 1] and lr > 0; got "
                             f"{self.l1_coefficient}, {self.l1_warm_up_fraction}, {self.lr}.")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"sae.eval_fraction must be in (0, 1), got {self.eval_fraction}.")
        if self.min_pos < 0:
            raise ValueError(f"sae.min_pos must be >= 0, got {self.min_pos}.")

    def d_sae(self, d_in: int) -> int:
        return max(1, int(round(self.expansion * d_in)))


@dataclass
class TrainedSAE:
    """An inference SAE (sae-lens ``SAE``) with where it came from and its metrics."""

    sae: Any
    role: str
    hook: str
    metrics: dict[str, Any]
    path: Path | None = None

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)


# ----------------------------------------------------------------------------------------------
def eval_text_mask(n_texts: int, eval_fraction: float, seed: int) -> np.ndarray:
    """``[n_texts]`` bool: which texts are held out of SAE training (the same for base and tuned)."""
    rng = np.random.default_rng([seed, 7919])
    mask = rng.random(n_texts) < eval_fraction
    if n_texts >= 2 and not mask.any():
        mask[rng.integers(n_texts)] = True
    if mask.all():
        mask[rng.integers(n_texts)] = False
    return mask


def _row_filter(idx: dict[str, Tensor], texts: np.ndarray | None, min_pos: int) -> Tensor:
    keep = (idx["pos"] >= min_pos) | (idx["pos"] < 0)  # pos -1: a reduced (mean) row has no position
    if texts is not None:
        keep &= torch.from_numpy(texts)[idx["text"]]
    return keep


def store_data_provider(
    store: ActivationStore,
    role: str,
    hook: str,
    batch_size: int,
    *,
    texts: np.ndarray | None = None,
    min_pos: int = 0,
    pool_rows: int = 65536,
    seed: int = 0,
) -> Iterator[Float[Tensor, "batch d"]]:
    """Endless ``[batch_size, d]`` float32 batches of ``(role, hook)`` rows: sae-lens's ``DataProvider``.

    ``texts``: ``[n_texts]`` bool mask of the texts whose rows are used (None: all); ``min_pos``: rows
    at token positions below it are left out. Rows are shuffled through a pool of ``pool_rows`` rows
    (each epoch reshuffles), so memory stays one shard plus the pool.

    >>> provider = store_data_provider(store, "tuned", "blocks.3.hook_resid_post", 256, min_pos=1)
    >>> next(provider).shape
    torch.Size([256, 576])
    """
    rng = np.random.default_rng(seed)
    carry: Tensor | None = None
    while True:
        pool: list[Tensor] = [] if carry is None else [carry]
        n_pool = 0 if carry is None else len(carry)
        n_epoch = 0
        for x, idx in store.iter_shards(role, hook, with_index=True):
            x = x[_row_filter(idx, texts, min_pos)].float()
            n_epoch += len(x)
            pool.append(x)
            n_pool += len(x)
            if n_pool >= pool_rows:
                carry = yield from _emit(pool, batch_size, rng)
                pool, n_pool = ([carry] if carry is not None else []), (0 if carry is None else len(carry))
        if n_epoch == 0:
            raise StoreError(f"Store {store.path} has no rows of ({role!r}, {hook!r}) at positions >= {min_pos}"
                             + (" in the selected texts" if texts is not None else "")
                             + "; capture more (or longer) texts, or lower min_pos.")
        carry = (yield from _emit(pool, batch_size, rng)) if pool else None


def _emit(pool: list[Tensor], batch_size: int, rng: np.random.Generator):
    x = torch.cat(pool)
    x = x[torch.from_numpy(rng.permutation(len(x)))]
    n_full = len(x) // batch_size
    for b in range(n_full):
        yield x[b * batch_size:(b + 1) * batch_size]
    rest = x[n_full * batch_size:]
    return rest if len(rest) else None


def _rows(store: ActivationStore, role: str, hook: str, texts: np.ndarray | None, min_pos: int,
          chunk: int = 4096) -> Iterator[Tensor]:
    for x, idx in store.iter_shards(role, hook, with_index=True):
        x = x[_row_filter(idx, texts, min_pos)].float()
        for i in range(0, len(x), chunk):
            yield x[i:i + chunk]


# ----------------------------------------------------------------------------------------------
def _training_sae(cfg: SAETrainConfig, d_in: int, *, role: str, hook: str, model_name: str):
    from sae_lens import (
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(model_name=model_name, hook_name=hook, irm_role=role, prepend_bos=True)
    common = dict(d_in=d_in, d_sae=cfg.d_sae(d_in), device=cfg.device, normalize_activations="none",
                  metadata=meta)
    if cfg.architecture == "standard":
        sae_cfg = StandardTrainingSAEConfig(l1_coefficient=cfg.l1_coefficient,
                                            l1_warm_up_steps=int(cfg.l1_warm_up_fraction * cfg.steps), **common)
        return StandardTrainingSAE(sae_cfg)
    if cfg.k > cfg.d_sae(d_in):
        raise ValueError(f"sae.k={cfg.k} exceeds the dictionary size {cfg.d_sae(d_in)} "
                         f"(expansion {cfg.expansion} x d_model {d_in}); lower k.")
    return TopKTrainingSAE(TopKTrainingSAEConfig(k=cfg.k, **common))


def train_sae(
    store: ActivationStore,
    role: str,
    hook: str,
    cfg: SAETrainConfig | None = None,
    *,
    seed: int = 0,
    out_dir: str | Path | None = None,
    model_name: str | None = None,
) -> TrainedSAE:
    """Train an SAE of ``cfg.architecture`` on the store's ``(role, hook)`` rows with sae-lens's trainer.

    Texts are split (:func:`eval_text_mask`, the same split for every role) into training texts and
    held-out texts; the metrics are computed on the held-out texts, the dead share on all rows. The
    input scale (sae-lens's ``expected_average_only_in``: rows scaled to mean norm ``sqrt(d_in)``) is
    estimated from the training rows and folded into the weights after training, so the returned SAE
    reads raw activations. With ``out_dir`` the SAE is saved there in sae-lens's format.

    >>> t = train_sae(store, "base", "blocks.3.hook_resid_post", SAETrainConfig(steps=200), out_dir="saes/base")
    >>> t.sae.encode(x)       # [n, d_sae] feature activations of raw activations x [n, d_in]
    """
    from sae_lens import SAE, SAETrainer
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    cfg = cfg or SAETrainConfig()
    t0 = time.perf_counter()
    d_in = store.d(hook)
    n_texts = int(store.manifest["dataset"]["n_texts"])
    held_out = eval_text_mask(n_texts, cfg.eval_fraction, seed)
    train_texts = ~held_out
    model_name = model_name or str(store.manifest.get("models", {}).get(role, {}).get("spec", role))

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sae = _training_sae(cfg, d_in, role=role, hook=hook, model_name=model_name)
    provider = store_data_provider(store, role, hook, cfg.batch_size, texts=train_texts, min_pos=cfg.min_pos,
                                   pool_rows=cfg.pool_rows, seed=seed)
    n_train_rows, norm_sum = 0, 0.0
    for x in _rows(store, role, hook, train_texts, cfg.min_pos):
        n_train_rows += len(x)
        norm_sum += float(x.norm(dim=-1).sum())
    if n_train_rows < cfg.batch_size:
        raise StoreError(f"Only {n_train_rows} training rows of ({role!r}, {hook!r}) in {store.path}, fewer than "
                         f"one batch ({cfg.batch_size}); capture more texts or lower [features.sae] batch_size.")
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr, lr_end=cfg.lr / 10, lr_scheduler_name="constant", device=cfg.device,
        # A feature that has not fired for a quarter of the run counts as dead (TopK's aux loss revives those).
        dead_feature_window=max(10, cfg.steps // 4), feature_sampling_window=max(10, cfg.steps // 4),
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=provider)
    if cfg.normalize == "expected_average_only_in":
        # Our own estimate from every training row (sae-lens would read n batches and show a progress
        # bar); fit() folds it into the weights afterwards, so the SAE reads raw activations.
        trainer.activation_scaler.scaling_factor = math.sqrt(d_in) / (norm_sum / n_train_rows)
    with torch.random.fork_rng(), _quiet_progress():
        torch.manual_seed(seed)
        trained = trainer.fit()
    train_seconds = time.perf_counter() - t0

    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="irm-sae-")
        out_dir = tmp.name
    out = Path(out_dir)
    trained.save_inference_model(out)
    inference = SAE.load_from_disk(out, device=cfg.device)
    inference.eval()

    ev = evaluate_sae(inference, _rows(store, role, hook, held_out, cfg.min_pos))
    every = evaluate_sae(inference, _rows(store, role, hook, None, cfg.min_pos))
    metrics = {
        "role": role, "hook": hook, "architecture": cfg.architecture, "d_in": d_in, "d_sae": cfg.d_sae(d_in),
        "explained_variance": ev["explained_variance"], "l0": ev["l0"], "mse": ev["mse"],
        "n_eval_rows": ev["n_rows"], "dead_share": every["dead_share"], "n_dead": every["n_dead"],
        "explained_variance_all_rows": every["explained_variance"], "n_train_rows": n_train_rows,
        "steps": cfg.steps, "batch_size": cfg.batch_size, "epochs": cfg.steps * cfg.batch_size / n_train_rows,
        "trainer_l0": trained.cfg.metadata.l0, "seed": seed, "train_seconds": train_seconds,
        "seconds": time.perf_counter() - t0, "config": asdict(cfg),
    }
    if tmp is not None:
        tmp.cleanup()
        path = None
    else:
        (out / SAE_METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str))
        path = out
    log.info("SAE %s %s: EV %.3f, L0 %.1f, dead %.1f%% (%d steps, %.1f s)", role, hook,
             metrics["explained_variance"], metrics["l0"], 100 * metrics["dead_share"], cfg.steps,
             metrics["seconds"])
    return TrainedSAE(sae=inference, role=role, hook=hook, metrics=metrics, path=path)


class _quiet_progress:
    """Silence sae-lens's own tqdm bar while training when irm's progress bars are off (IRM_PROGRESS=0)."""

    def __enter__(self):
        import os
        from functools import partial

        import sae_lens.training.sae_trainer as st

        self._mod, self._orig = st, st.tqdm
        if os.environ.get("IRM_PROGRESS", "1") == "0":
            st.tqdm = partial(self._orig, disable=True)
        return self

    def __exit__(self, *exc):
        self._mod.tqdm = self._orig


# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_sae(sae, batches: Iterable[Float[Tensor, "n d"]]) -> dict[str, float]:
    """Explained variance, L0, MSE and dead features of ``sae`` over the rows of ``batches``.

    ``explained_variance = 1 - sum ||x - sae(x)||^2 / sum ||x - mean(x)||^2`` (one mean over all rows);
    ``l0`` = mean active features per row; ``dead_share`` = share of features active on no row.

    >>> evaluate_sae(sae, [x_eval])["explained_variance"]
    """
    d_sae = int(sae.cfg.d_sae)
    n, sse, l0 = 0, 0.0, 0.0
    s1: Tensor | None = None
    s2 = 0.0
    fired = torch.zeros(d_sae, dtype=torch.bool)
    for x in batches:
        x = x.to(sae.device, torch.float32)
        f = sae.encode(x)
        xh = sae.decode(f)
        sse += float(((x - xh) ** 2).sum())
        s1 = x.double().sum(0) if s1 is None else s1 + x.double().sum(0)
        s2 += float((x.double() ** 2).sum())
        active = f > 0
        l0 += float(active.sum())
        fired |= active.any(0).cpu()
        n += len(x)
    if n == 0:
        raise ValueError("evaluate_sae got no rows; the held-out texts may have no rows at positions >= min_pos.")
    sst = s2 - float((s1 ** 2).sum()) / n
    return {"explained_variance": 1.0 - sse / sst if sst > 0 else float("nan"), "l0": l0 / n, "mse": sse / n,
            "dead_share": float((~fired).float().mean()), "n_dead": int((~fired).sum()), "n_rows": n}


@torch.no_grad()
def encode_rows(sae, x: Float[Tensor, "n d_in"], *, chunk: int = 8192) -> Float[Tensor, "n d_sae"]:
    """Feature activations of raw activation rows, in chunks (float32, on the CPU)."""
    out = [sae.encode(x[i:i + chunk].to(sae.device, torch.float32)).cpu() for i in range(0, len(x), chunk)]
    return torch.cat(out) if out else torch.zeros(0, int(sae.cfg.d_sae))


def effective_decoder(sae) -> Float[Tensor, "d_sae d_in"]:
    """The rows that ``decode`` multiplies feature activations with: ``W_dec``, or its unit rows for a
    TopK SAE with ``rescale_acts_by_decoder_norm`` (whose decode divides by the row norms)."""
    w = sae.W_dec.detach().float().cpu()
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return w


def decoder_directions(sae) -> Float[Tensor, "d_sae d_in"]:
    """Unit-norm decoder rows ``W_dec[i] / ||W_dec[i]||``: the feature directions in activation space."""
    w = sae.W_dec.detach().float().cpu()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


# ----------------------------------------------------------------------------------------------
def save_sae(trained: TrainedSAE, path: str | Path) -> Path:
    """Save in sae-lens's format (``cfg.json``, ``sae_weights.safetensors``) plus our metrics file."""
    path = Path(path)
    trained.sae.save_model(path)
    (path / SAE_METRICS_FILE).write_text(json.dumps(trained.metrics, indent=2, default=str))
    trained.path = path
    return path


def pretrained_sae_ids(release: str) -> list[str]:
    """SAE ids of a release in sae-lens's registry (read from the installed package, no network).

    >>> pretrained_sae_ids("pythia-70m-deduped-res-sm")[:2]
    ['blocks.0.hook_resid_pre', 'blocks.0.hook_resid_post']
    """
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        import difflib

        close = difflib.get_close_matches(release, list(directory), n=3)
        raise ValueError(f"Release {release!r} is not in sae-lens's registry ({len(directory)} releases)"
                         + (f"; did you mean {close}?" if close else "")
                         + " Browse them with sae_lens.loading.pretrained_saes_directory.get_pretrained_saes_directory().")
    return list(directory[release].saes_map)


def load_sae(source: str | Path, sae_id: str | None = None, *, device: str = "cpu", dtype: str = "float32"):
    """An inference SAE from a local directory in sae-lens's format, or from the sae-lens registry.

    - ``load_sae("runs/x/features/saes/tuned-blocks.3.hook_resid_post")``: a saved SAE
      (``SAE.load_from_disk``);
    - ``load_sae("pythia-70m-deduped-res-sm", "blocks.3.hook_resid_post")``: a registry release and SAE id
      (``SAE.from_pretrained``; downloads from the hub once, then reads the HF cache).

    >>> sae = load_sae("pythia-70m-deduped-res-sm", "blocks.3.hook_resid_post")
    >>> sae.cfg.d_in, sae.cfg.metadata.hook_name
    """
    from sae_lens import SAE

    path = Path(source).expanduser()
    if sae_id is None:
        if not path.is_dir():
            raise FileNotFoundError(
                f"No SAE directory at {path.resolve()}. Pass a directory saved in sae-lens's format (cfg.json + "
                "sae_weights.safetensors), or a registry release with an sae_id, e.g. "
                "load_sae('pythia-70m-deduped-res-sm', 'blocks.3.hook_resid_post').")
        if not (path / "cfg.json").is_file():
            raise FileNotFoundError(f"{path.resolve()} holds no cfg.json: not an SAE saved in sae-lens's format.")
        return SAE.load_from_disk(path, device=device, dtype=dtype)
    ids = pretrained_sae_ids(str(source))
    if sae_id not in ids:
        raise ValueError(f"SAE id {sae_id!r} is not in release {source!r}; valid ids: {ids[:8]}"
                         + (f" ... ({len(ids)} in all)" if len(ids) > 8 else "") + ".")
    return SAE.from_pretrained(str(source), sae_id, device=device, dtype=dtype)
