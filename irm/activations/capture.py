"""Capture activations of base and tuned into an :class:`~irm.activations.store.ActivationStore`.

The capture is

- **padding-correct**: texts are left-padded within a batch and the attention mask goes to the model,
  so a batched capture equals a one-text-at-a-time capture to float precision;
- **memory-bounded**: hooks reduce activations to the rows asked for as the forward pass runs, and
  only one batch plus one shard are ever in memory;
- **resumable**: shard ``i`` covers a fixed range of texts and is committed atomically, so a rerun
  after a kill computes only the missing shards;
- **careful**: an unknown hook fails before any forward pass, with close matches suggested, and an
  existing store is never overwritten without ``overwrite=True``.

Position rules (``positions``):

``all``            every real (non-pad) token of every text
``last``           the last token of each text
``response_mean``  the mean over the response's tokens (records with a prompt and a response)
``target``         the last token of a target word or span in each text (records with a target)

With ``logprobs=True`` the same forward pass also stores, per text and model, the log-probability of
the text's response (``sum log p(t | ctx)`` over the tokens after ``prompt_chars``), read with
:meth:`~irm.activations.store.ActivationStore.logprobs`: one pass instead of a capture plus a scoring pass.

>>> capture_activations({"base": base, "tuned": tuned}, records, "stores/run1",
...                     hooks=["blocks.3.hook_resid_post"], positions="last")
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from irm.activations.store import ActivationStore, activation_key, logprob_key
from irm.core.constants import (
    DEFAULT_HOOK_TEMPLATE,
    POSITION_RULES,
    STORE_FORMAT_VERSION,
    STORE_MANIFEST,
    STORE_SHARD_DIR,
)
from irm.core.io import file_sha256, write_json_atomic
from irm.core.log import get_logger, progress
from irm.core.threads import ModelThreads
from irm.models import LoadedModel, token_logprobs

__all__ = [
    "CaptureRecord",
    "POSITION_RULES",
    "response_words",
    "word_end_tokens",
    "capture_activations",
    "expand_hooks",
    "validate_hooks",
    "records_from_texts",
    "records_from_pairs",
    "StoreExistsError",
]

log = get_logger(__name__)

_STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class StoreExistsError(FileExistsError):
    """The output directory holds something that a capture would overwrite."""


@dataclass(frozen=True)
class CaptureRecord:
    """One text to run. ``prompt_chars``: where the response starts (for ``response_mean``);
    ``target``: the character span ``(start, end)`` of the target word (for ``target``)."""

    text: str
    prompt_chars: int | None = None
    target: tuple[int, int] | None = None


def records_from_texts(texts: Sequence[str], targets: Sequence[str] | None = None) -> list[CaptureRecord]:
    """Plain texts; with ``targets``, each text's first whole-word occurrence of its target word."""
    if targets is None:
        return [CaptureRecord(t) for t in texts]
    if len(targets) != len(texts):
        raise ValueError(f"Got {len(texts)} texts but {len(targets)} targets.")
    out = []
    for i, (t, w) in enumerate(zip(texts, targets, strict=True)):
        m = re.search(r"(?<!\w)" + re.escape(w) + r"(?!\w)", t, flags=re.IGNORECASE)
        if m is None:
            raise ValueError(f"Record {i}: target word {w!r} does not occur in its text {t!r}.")
        out.append(CaptureRecord(t, target=(m.start(), m.end())))
    return out


_WORD_RE = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


def response_words(text: str, start: int = 0) -> list[tuple[int, int]]:
    """Character spans of the words (letters, with an inner apostrophe) of ``text[start:]``."""
    return [(start + m.start(), start + m.end()) for m in _WORD_RE.finditer(text[start:])]


def word_end_tokens(text: str, start: int, offsets: np.ndarray) -> np.ndarray:
    """Token positions of the last token of each word of ``text[start:]`` (``offsets``: ``[n, 2]`` character
    offsets of the tokens); words cut off by truncation are left out. The rule ``"words"``: where the
    model has read each whole word of the response."""
    out = []
    for s, e in response_words(text, start):
        hit = np.nonzero((offsets[:, 0] < e) & (offsets[:, 1] > s))[0]
        if len(hit) and offsets[hit[-1], 1] >= e:
            out.append(int(hit[-1]))
    return np.array(sorted(set(out)), dtype=np.int64)


def records_from_pairs(prompts: Sequence[str], responses: Sequence[str]) -> list[CaptureRecord]:
    """(prompt, response) pairs; the text is ``prompt + response``."""
    if len(prompts) != len(responses):
        raise ValueError(f"Got {len(prompts)} prompts but {len(responses)} responses.")
    return [CaptureRecord(p + r, prompt_chars=len(p)) for p, r in zip(prompts, responses, strict=True)]


# ----------------------------------------------------------------------------------------------
def expand_hooks(hooks: Sequence[str] | None, n_layers: int, layers: Sequence[int] | str | None = "all") -> list[str]:
    """Expand ``{layer}`` templates over ``layers`` (``"all"``, or a list of ints; negatives count back)."""
    hooks = list(hooks) if hooks else [DEFAULT_HOOK_TEMPLATE]
    if layers is None or layers == "all":
        layer_ids = list(range(n_layers))
    else:
        layer_ids = []
        for layer in layers:
            li = int(layer) + (n_layers if int(layer) < 0 else 0)
            if not 0 <= li < n_layers:
                raise ValueError(f"Layer {layer} is out of range for a model with {n_layers} layers.")
            layer_ids.append(li)
    out: list[str] = []
    for h in hooks:
        names = [h.format(layer=li) for li in layer_ids] if "{layer}" in h else [h]
        out.extend(n for n in names if n not in out)
    return out


def validate_hooks(bridge, hooks: Sequence[str]) -> None:
    """Fail before any forward pass if a hook name is unknown, suggesting close matches."""
    valid = set(bridge.hook_dict)
    bad = [h for h in hooks if h not in valid]
    if bad:
        lines = []
        for h in bad:
            close = difflib.get_close_matches(h, valid, n=3, cutoff=0.6)
            lines.append(f"  {h!r}" + (f" -> did you mean {', '.join(map(repr, close))}?" if close else ""))
        raise KeyError(
            f"Unknown hook name(s) for this model ({len(valid)} hooks exist, e.g. "
            f"'blocks.0.hook_resid_post', 'blocks.0.hook_mlp_out'):\n" + "\n".join(lines)
        )


def _hook_layer(name: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None


class _StopForward(Exception):
    """Raised by the last hook so layers after it (and the unembedding) are never computed."""


# ----------------------------------------------------------------------------------------------
@dataclass
class _Tokenized:
    ids: list[list[int]]
    select: list[np.ndarray]  # per text: token positions whose rows are kept (or weighted)
    reduce_mean: bool
    response: list[np.ndarray] | None = None  # per text: positions of response tokens (logprobs)
    n_prompt: list[int] | None = None  # per text: leading tokens that lie wholly in the prompt (or None)


def _tokenize(tokenizer, records: Sequence[CaptureRecord], rule: str, max_length: int,
              logprobs: bool = False) -> _Tokenized:
    enc = tokenizer(
        [r.text for r in records],
        add_special_tokens=True,
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
    )
    ids: list[list[int]] = []
    select: list[np.ndarray] = []
    response: list[np.ndarray] = []
    n_prompt: list[int] = []
    for i, (rec, tok_ids, offs) in enumerate(zip(records, enc["input_ids"], enc["offset_mapping"], strict=True)):
        if not tok_ids:
            raise ValueError(f"Record {i} tokenizes to no tokens: {rec.text!r}. Remove empty texts.")
        offs = np.asarray(offs, dtype=np.int64).reshape(-1, 2)
        n = len(tok_ids)
        if rule == "all":
            sel = np.arange(n)
        elif rule == "last":
            sel = np.array([n - 1])
        elif rule == "response_mean":
            if rec.prompt_chars is None:
                raise ValueError(f"Record {i} has no prompt/response split; 'response_mean' needs "
                                 "(prompt, response) records (records_from_pairs).")
            # A token belongs to the response if it covers any response character.
            sel = np.nonzero(offs[:, 1] > rec.prompt_chars)[0]
            if len(sel) == 0:
                raise ValueError(f"Record {i}: the response is empty or was truncated away "
                                 f"(max_length={max_length}): {rec.text!r}")
        elif rule == "target":
            if rec.target is None:
                raise ValueError(f"Record {i} has no target span; 'target' needs records with targets.")
            s, e = rec.target
            hit = np.nonzero((offs[:, 0] < e) & (offs[:, 1] > s))[0]
            if len(hit) == 0:
                raise ValueError(f"Record {i}: no token covers the target span {rec.target} "
                                 f"({rec.text[s:e]!r}); was it truncated (max_length={max_length})?")
            sel = hit[-1:]  # the word's last token: the model has read the whole word there
        elif rule == "words":
            if rec.prompt_chars is None:
                raise ValueError(f"Record {i} has no prompt/response split; 'words' needs (prompt, response) "
                                 "records (records_from_pairs).")
            sel = word_end_tokens(rec.text, rec.prompt_chars, offs)
            if len(sel) == 0:
                raise ValueError(f"Record {i}: its response has no word (letters) left within max_length="
                                 f"{max_length}: {rec.text!r}. Leave such records out (see response_words).")
        else:
            raise ValueError(f"Unknown position rule {rule!r}; valid rules are {POSITION_RULES}.")
        if logprobs:
            if rec.prompt_chars is None:
                raise ValueError(f"Record {i} has no prompt/response split; logprobs=True scores the response "
                                 "of each record, so give every record prompt_chars.")
            resp = np.nonzero(offs[:, 1] > rec.prompt_chars)[0]
            resp = resp[resp > 0]  # the first token has no context to be predicted from
            if len(resp) == 0:
                raise ValueError(f"Record {i}: no response token to score (empty, or truncated at "
                                 f"max_length={max_length}): {rec.text!r}")
            response.append(resp)
        ids.append(list(tok_ids))
        select.append(sel)
        if rec.prompt_chars is None:
            n_prompt.append(0)
        else:  # offsets only grow: the prompt's tokens are those before the first one that reaches past it
            past = np.nonzero(offs[:, 1] > rec.prompt_chars)[0]
            n_prompt.append(int(past[0]) if len(past) else n)
    return _Tokenized(ids, select, reduce_mean=(rule == "response_mean"), response=response if logprobs else None,
                      n_prompt=n_prompt)


def _settings_fingerprint(settings: Mapping[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("irm")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def capture_activations(
    models: Mapping[str, LoadedModel],
    records: Sequence[CaptureRecord],
    out_dir: str | Path,
    *,
    hooks: Sequence[str] | None = None,
    layers: Sequence[int] | str | None = "all",
    positions: str = "all",
    batch_size: int = 16,
    shard_size: int = 256,
    max_length: int = 256,
    dtype: str = "float32",
    overwrite: bool = False,
    dataset: Mapping[str, Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
    logprobs: bool = False,
    share_prefix: bool = False,
    _stop_after_shards: int | None = None,
) -> ActivationStore:
    """Run ``records`` through every model in ``models`` (e.g. ``{"base": ..., "tuned": ...}``) and
    store the ``hooks`` activations at ``positions`` in ``out_dir``.

    Returns the store. With ``rank``/``world_size`` each process computes shards ``i`` with
    ``i % world_size == rank`` into the same directory; rank 0 finalises the manifest once every
    shard is present. Under ``torch.distributed`` (:mod:`irm.activations.distributed`) one call per rank does it
    all: rank 0 prepares the directory before the others look at it, and every rank returns once the
    manifest is complete. Without it, call it again on rank 0 once every rank is done.

    ``logprobs=True`` (records with ``prompt_chars``) also stores each model's log-probability of each
    record's response from the same forward pass (:meth:`ActivationStore.logprobs`).

    ``share_prefix=True`` computes a prompt shared by several records of a shard once and runs only the
    rest of each record on top of its key/value cache (records with ``prompt_chars``, e.g. one sentence
    template filled with many words). The activations equal those of full passes to float precision;
    each shard checks one record against a full pass and falls back to full passes (with a warning)
    if a model does not reproduce it.
    """
    t0 = time.perf_counter()
    if not models:
        raise ValueError("capture_activations needs at least one model, e.g. {'base': ..., 'tuned': ...}.")
    if not records:
        raise ValueError("capture_activations got an empty dataset: nothing to capture.")
    if positions not in POSITION_RULES:
        raise ValueError(f"Unknown position rule {positions!r}; valid rules are {POSITION_RULES}.")
    if dtype not in _STORE_DTYPES:
        raise ValueError(f"Unknown store dtype {dtype!r}; valid: {sorted(_STORE_DTYPES)}.")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}.")
    roles = list(models)
    first = models[roles[0]]
    hooks = expand_hooks(hooks, first.n_layers, layers)
    for m in models.values():
        validate_hooks(m.bridge, hooks)  # before any forward pass
    tokenizer = first.tokenizer
    if logprobs:
        for m in models.values():
            if m.hf_model.get_output_embeddings() is None or getattr(m.hf_model.config, "final_logit_softcapping",
                                                                      None):
                raise NotImplementedError(f"{m.identity.spec}: logprobs=True needs a plain unembedding.")
            validate_hooks(m.bridge, [_FINAL_NORM_HOOK])
    tok = _tokenize(tokenizer, records, positions, max_length, logprobs=logprobs)

    out_dir = Path(out_dir)
    n = len(records)
    n_shards = (n + shard_size - 1) // shard_size
    from irm.data import texts_hash

    settings = {
        "models": {r: m.identity.to_dict() for r, m in models.items()},
        "hooks": hooks,
        "positions": {"rule": positions},
        "dtype": dtype,
        "max_length": max_length,
        "shard_size": shard_size,
        "dataset_hash": texts_hash([r.text for r in records]),
        "record_hash": texts_hash([json.dumps(asdict(r), sort_keys=True) for r in records]),
    }
    if logprobs:  # only when set, so stores made before the option keep their fingerprint
        settings["logprobs"] = True
    if share_prefix:  # equal to float precision, not bit for bit: a store is not resumed across the switch
        settings["share_prefix"] = True
    fingerprint = _settings_fingerprint(settings)
    manifest = {
        "format_version": STORE_FORMAT_VERSION,
        "irm_version": _version(),
        "fingerprint": fingerprint,
        "roles": roles,
        **settings,
        "dataset": {"n_texts": n, "hash": settings["dataset_hash"], **(dict(dataset) if dataset else {})},
        "n_shards": n_shards,
        "complete": False,
    }
    from irm.activations.distributed import barrier, is_distributed

    # Ranks other than 0 wait until rank 0 has checked (or, with overwrite, removed) the directory
    # and written the manifest: before that they could find a half-made store and refuse it, or
    # commit shards that rank 0's overwrite then deletes.
    synced = world_size > 1 and is_distributed()
    if synced and rank != 0:
        barrier()
    _prepare_dir(out_dir, fingerprint, settings, overwrite, rank)
    shard_dir = out_dir / STORE_SHARD_DIR
    if rank == 0:
        shard_dir.mkdir(parents=True, exist_ok=True)
        if not (out_dir / STORE_MANIFEST).is_file():
            write_json_atomic(out_dir / STORE_MANIFEST, manifest)
        if synced:
            barrier()
    store = ActivationStore(out_dir, allow_incomplete=True) if (out_dir / STORE_MANIFEST).is_file() else None

    mine = [i for i in range(n_shards) if i % world_size == rank]
    done = {s.index for s in store.completed_shards()} if store else set()
    todo = [i for i in mine if i not in done]
    if done & set(mine):
        log.info("Resuming store %s: %d of %d shards already done", out_dir, len(done & set(mine)), len(mine))
    stop_layer = None
    layers_of = [_hook_layer(h) for h in hooks]
    if all(li is not None for li in layers_of) and not logprobs:
        stop_layer = max(li for li in layers_of if li is not None) + 1

    # One step is one text through one model.
    bar = progress(total=len(roles) * sum(min(shard_size, n - i * shard_size) for i in todo),
                   desc=f"capture {'+'.join(roles)}", unit="pass")
    d_of: dict[str, int] = {}
    for k, i in enumerate(todo):
        if _stop_after_shards is not None and k >= _stop_after_shards:
            raise KeyboardInterrupt(f"stopped after {k} shards (test hook)")
        lo, hi = i * shard_size, min((i + 1) * shard_size, n)
        tensors = _capture_shard(models, tok, range(lo, hi), hooks, batch_size, stop_layer,
                                 tokenizer.pad_token_id, _STORE_DTYPES[dtype], bar, logprobs=logprobs,
                                 share_prefix=share_prefix)
        for h in hooks:
            d_of[h] = int(tensors[activation_key(roles[0], h)].shape[-1])
        _commit_shard(shard_dir, i, tensors)
    bar.close()

    if synced:
        barrier()  # every rank's shards are committed before rank 0 counts them
    if rank == 0:
        store = ActivationStore(out_dir, allow_incomplete=True)
        completed = store.completed_shards()
        if len(completed) == n_shards:
            if not d_of:  # every shard was already there: read the widths back from one
                from safetensors import safe_open

                with safe_open(str(store.shard_path(0)), framework="pt") as f:
                    d_of = {h: int(f.get_slice(activation_key(roles[0], h)).get_shape()[-1]) for h in hooks}
            manifest.update(
                complete=True,
                d=d_of,
                total_rows=sum(s.rows for s in completed),
                shards=[{"index": s.index, "rows": s.rows, "sha256": s.sha256} for s in completed],
            )
            write_json_atomic(out_dir / STORE_MANIFEST, manifest)
            log.info("Captured %d rows x %d hooks x %d models into %s in %.1f s",
                     manifest["total_rows"], len(hooks), len(roles), out_dir, time.perf_counter() - t0)
    if synced:
        barrier()  # no rank returns before the manifest is complete
    return ActivationStore(out_dir, allow_incomplete=world_size > 1 and not synced)


def _prepare_dir(out_dir: Path, fingerprint: str, settings: Mapping[str, Any], overwrite: bool, rank: int) -> None:
    mf = out_dir / STORE_MANIFEST
    if overwrite and rank == 0 and out_dir.exists():
        shutil.rmtree(out_dir)
        return
    if mf.is_file():
        old = json.loads(mf.read_text())
        if old.get("fingerprint") == fingerprint:
            return  # same settings: resume (or nothing left to do)
        diffs = [k for k, v in settings.items()
                 if json.dumps(old.get(k), sort_keys=True, default=str) != json.dumps(v, sort_keys=True, default=str)]
        raise StoreExistsError(
            f"{out_dir} already holds a store made with different settings"
            + (f" (differs in: {', '.join(diffs)})" if diffs else "")
            + ". Pass --overwrite (overwrite=True) to replace it, or choose another output directory."
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise StoreExistsError(
            f"{out_dir} exists and is not an activation store; refusing to write into it. "
            "Choose another output directory or pass --overwrite."
        )


def _capture_shard(
    models: Mapping[str, LoadedModel],
    tok: _Tokenized,
    idx: range,
    hooks: Sequence[str],
    batch_size: int,
    stop_layer: int | None,
    pad_id: int,
    store_dtype: torch.dtype,
    bar,
    logprobs: bool = False,
    share_prefix: bool = False,
) -> dict[str, Tensor]:
    per_text: dict[str, dict[int, Tensor]] = {activation_key(r, h): {} for r in models for h in hooks}
    lp_text: dict[str, dict[int, float]] = {logprob_key(r): {} for r in models} if logprobs else {}
    rec_hooks = list(hooks) + ([_FINAL_NORM_HOOK] if logprobs and _FINAL_NORM_HOOK not in hooks else [])

    def keep(role: str, m: LoadedModel, batch: list[int], acts: dict[str, Tensor], ids: Tensor,
             offsets: list[int]) -> None:
        """Store one batch's rows; row ``r`` holds text ``batch[r]`` from column ``offsets[r]`` on."""
        if logprobs:
            assert tok.response is not None
            lp = _response_logprobs(m, acts[_FINAL_NORM_HOOK], ids,
                                    [tok.response[j] + o for j, o in zip(batch, offsets, strict=True)])
            lp_text[logprob_key(role)].update(zip(batch, lp, strict=True))
        for h in hooks:
            x = acts[h]
            store = per_text[activation_key(role, h)]
            for r, j in enumerate(batch):
                rows = x[r, offsets[r] + tok.select[j]]  # [k, d] at the text's own positions
                store[j] = rows.mean(0, keepdim=True) if tok.reduce_mean else rows

    # share_prefix: texts that begin alike (a prompt, or a perturbation and its original) form a prefix
    # tree; each runs only its tokens after what it shares with its parent, on the parent's cache.
    tree = _ShareForest(tok, idx) if share_prefix else None
    rest = tree.alone if tree is not None else list(idx)
    with contextlib.ExitStack() as attached:
        recorders = {role: attached.enter_context(_HookRecorder(m, rec_hooks)) for role, m in models.items()}
        if tree is not None and tree.members:
            with ModelThreads(list(models.values())) as side_by_side:  # each model checks itself
                ok = side_by_side.map([functools.partial(_tree_ok_once, m, tok, tree, rec_hooks, stop_layer,
                                                         recorders[role], pad_id, logprobs)
                                       for role, m in models.items()])
            if not all(ok):
                rest, tree = sorted(idx), None
        # Sort the texts by length so batches carry little padding; rows go back in dataset order.
        order = sorted(rest, key=lambda j: len(tok.ids[j]))
        batches = [order[b0 : b0 + batch_size] for b0 in range(0, len(order), batch_size)]

        def run(role: str, m: LoadedModel) -> None:
            """Every batch of the shard through one model (the models run side by side on a CPU)."""
            for batch in batches:
                lens = [len(tok.ids[j]) for j in batch]
                width = max(lens)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, j in enumerate(batch):
                    ids[r, width - lens[r]:] = torch.tensor(tok.ids[j])
                    mask[r, width - lens[r]:] = 1
                acts = _forward_hooks(m, ids, mask, rec_hooks, stop_layer, recorders[role])
                keep(role, m, batch, acts, ids, [width - n_ for n_ in lens])
                bar.update(len(batch))
            if tree is not None and tree.members:

                def emit(j: int, acts_j: dict[str, Tensor], lp_j: float | None) -> None:
                    if logprobs:
                        lp_text[logprob_key(role)][j] = float(lp_j)  # type: ignore[arg-type]
                    for h in hooks:
                        rows = acts_j[h][tok.select[j]]
                        per_text[activation_key(role, h)][j] = rows.mean(0, keepdim=True) if tok.reduce_mean else rows
                    bar.update(1)

                _TreeRunner(m, tok, rec_hooks, stop_layer, recorders[role], pad_id, logprobs).run(
                    tree, tree.members, batch_size, emit)

        with ModelThreads(list(models.values())) as side_by_side:
            side_by_side.map([functools.partial(run, role, m) for role, m in models.items()])
    out: dict[str, Tensor] = {}
    for key, d in per_text.items():
        out[key] = torch.cat([d[j] for j in idx]).to(store_dtype).contiguous()
    for key, lps in lp_text.items():
        out[key] = torch.tensor([lps[j] for j in idx], dtype=torch.float64)
    text_idx, pos, token = [], [], []
    for j in idx:
        sel = tok.select[j]
        if tok.reduce_mean:
            text_idx.append(np.array([j])), pos.append(np.array([-1])), token.append(np.array([-1]))
        else:
            text_idx.append(np.full(len(sel), j)), pos.append(sel), token.append(np.asarray(tok.ids[j])[sel])
    out["index/text"] = torch.from_numpy(np.concatenate(text_idx).astype(np.int64))
    out["index/pos"] = torch.from_numpy(np.concatenate(pos).astype(np.int64))
    out["index/token"] = torch.from_numpy(np.concatenate(token).astype(np.int64))
    return out


# A text runs on its parent's key/value cache when the two share at least this many leading tokens.
_MIN_PREFIX_SAVING = 4
# Subtrees are run in chunks of about this many texts (the caches a level holds at once).
_TREE_CHUNK = 1024
# A text runs on its grandparent's cache when its parent's saves it fewer than this many more tokens.
_MIN_LEVEL_GAIN = 8
# Siblings (one parent, one shared length) this many or more get batches of their own.
_SIBLING_BATCH = 8


class _ShareForest:
    """The texts of a shard in a prefix tree (:class:`irm.models.sharing.ShareTree`), in shard indices:
    ``members`` (texts with a parent or children, run through the tree) and ``alone`` (full passes)."""

    def __init__(self, tok: _Tokenized, idx: range) -> None:
        from irm.models.sharing import ShareTree

        js = list(idx)
        t = ShareTree([tok.ids[j] for j in js], min_shared=_MIN_PREFIX_SAVING)
        parent, shared = list(t.parent), list(t.shared)
        # A level costs forward calls of its own: a text that shares only a few tokens more with its parent
        # than the parent with its own runs on the grandparent's cache instead (a template's words that
        # begin alike stay siblings; a perturbation stays on its original).
        for k in t.order:  # parents come first
            while parent[k] >= 0 and parent[parent[k]] >= 0 and shared[k] - shared[parent[k]] < _MIN_LEVEL_GAIN:
                parent[k], shared[k] = parent[parent[k]], shared[parent[k]]
        children: list[list[int]] = [[] for _ in js]
        for k in t.order:
            if parent[k] >= 0:
                children[parent[k]].append(k)
        self.parent = {js[k]: (js[p] if p >= 0 else -1) for k, p in enumerate(parent)}
        self.shared = {js[k]: c for k, c in enumerate(shared)}
        self.children = {js[k]: [js[c] for c in cs] for k, cs in enumerate(children)}
        in_tree = {js[k] for k in range(len(js)) if parent[k] >= 0 or children[k]}
        self.members = [js[k] for k in t.order if js[k] in in_tree]  # sorted order: subtrees are contiguous
        self.alone = [j for j in js if j not in in_tree]

    def chunks(self, texts: list[int], max_texts: int) -> list[list[int]]:
        """``texts`` (whole subtrees, in sorted order) cut between subtrees into chunks of about ``max_texts``."""
        out: list[list[int]] = [[]]
        for j in texts:
            if self.parent[j] < 0 and len(out[-1]) >= max_texts:
                out.append([])
            out[-1].append(j)
        return out


class _TreeState:
    """What a text's children need of it: its key/value cache, activations at every position, and its
    response log-probabilities by position."""

    __slots__ = ("kv", "acts", "lp_at")

    def __init__(self, kv: list[tuple[Tensor, Tensor]], acts: dict[str, Tensor], lp_at: dict[int, float]) -> None:
        self.kv, self.acts, self.lp_at = kv, acts, lp_at


class _TreeRunner:
    """Runs whole subtrees of a :class:`_ShareForest` through one model, level by level: roots as
    right-padded full passes, then each level's texts on their parents' caches (padded to the batch's
    longest shared part, the rest masked; positions follow from the mask), only their own tokens.
    Activations at a shared position are the parent's (same tokens before it, a causal model); so is
    the log-probability of a response token inside the shared part. ``emit(text, acts, logprob_sum)``
    receives every text's activations at all its positions."""

    def __init__(self, m: LoadedModel, tok: _Tokenized, hooks: Sequence[str], stop_layer: int | None,
                 recorder: _HookRecorder, pad_id: int, logprobs: bool) -> None:
        self.m, self.tok, self.hooks, self.stop_layer = m, tok, list(hooks), stop_layer
        self.recorder, self.pad_id, self.logprobs = recorder, pad_id, logprobs

    def run(self, forest: _ShareForest, texts: list[int], batch_size: int, emit) -> None:
        for chunk in forest.chunks(texts, _TREE_CHUNK):
            self._run_chunk(forest, chunk, batch_size, emit)

    def _kv(self, cache, r: int, spans: list[tuple[int, int]]) -> list[tuple[Tensor, Tensor]]:
        from irm.models.sharing import cache_layers

        out = []
        for k_, v_ in cache_layers(cache):
            if k_ is None or k_.numel() == 0:  # a pass stopped early: deeper layers were never run
                break
            out.append((torch.cat([k_[r, :, a:b] for a, b in spans], 1).clone(),
                        torch.cat([v_[r, :, a:b] for a, b in spans], 1).clone()))
        return out

    def _logprobs(self, finals: list[Tensor], rows: list[int], known: list[dict[int, float]],
                  shared_at: list[tuple[int, int] | None]) -> list[dict[int, float]]:
        """Per text ``rows[r]``: log-probability of each response token, from its final-norm outputs
        ``finals[r]`` ([n, d]); positions in ``known[r]`` are taken from there. A row's first own token
        (predicted from the last shared position) is unembedded once per ``shared_at[r]`` key (parent,
        shared length) and looked up for the siblings that share it."""
        tok = self.tok
        assert tok.response is not None
        todo_h, todo_t, owner = [], [], []
        out: list[dict[int, float]] = []
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for r, j in enumerate(rows):
            d = {}
            for p in tok.response[j].tolist():
                if p in known[r]:
                    d[p] = known[r][p]
                elif shared_at[r] is not None and p == shared_at[r][1]:
                    groups.setdefault(shared_at[r], []).append((r, p))
                else:
                    todo_h.append(finals[r][p - 1])
                    todo_t.append(tok.ids[j][p])
                    owner.append((r, p))
            out.append(d)
        for members in groups.values():
            if len(members) == 1:
                r, p = members[0]
                todo_h.append(finals[r][p - 1])
                todo_t.append(tok.ids[rows[r]][p])
                owner.append((r, p))
                continue
            r0, p0 = members[0]
            lsm = _log_softmax_at(self.m, finals[r0][p0 - 1 : p0])[0]  # once for the siblings
            for r, p in members:
                out[r][p] = float(lsm[tok.ids[rows[r]][p]])
        if todo_h:
            lp = _log_softmax_at(self.m, torch.stack(todo_h), torch.tensor(todo_t)).double().cpu().tolist()
            for (r, p), v in zip(owner, lp, strict=True):
                out[r][p] = v
        for r, d in enumerate(out):
            if not all(np.isfinite(list(d.values()))):
                raise FloatingPointError(f"Non-finite log-probabilities from {self.m.identity.spec!r} for text "
                                         f"{rows[r]}; check weights and dtype.")
        return out

    def _run_chunk(self, forest: _ShareForest, texts: list[int], batch_size: int, emit) -> None:
        from irm.models.sharing import batches as cut_batches
        from irm.models.sharing import padded_cache, repeated_cache

        tok, m, hooks = self.tok, self.m, self.hooks
        lens = {j: len(tok.ids[j]) for j in texts}
        inside = set(texts)
        states: dict[int, _TreeState] = {}
        level = [j for j in texts if forest.parent[j] < 0 or forest.parent[j] not in inside]
        for batch in cut_batches(level, lens, batch_size, m.device):  # roots: right-padded full passes
            ids, mask = _right_padded([tok.ids[j] for j in batch], self.pad_id)
            cache = _new_cache(m)
            acts = _forward_hooks(m, ids, mask, hooks, self.stop_layer, self.recorder, past=cache)
            per = [{h: acts[h][r, : lens[j]] for h in hooks} for r, j in enumerate(batch)]
            lps = (self._logprobs([a[_FINAL_NORM_HOOK] for a in per], batch, [{}] * len(batch), [None] * len(batch))
                   if self.logprobs else [{}] * len(batch))
            for r, j in enumerate(batch):
                emit(j, per[r], sum(lps[r].values()) if self.logprobs else None)
                if forest.children[j]:
                    states[j] = _TreeState(self._kv(cache, r, [(0, lens[j])]),
                                           {h: x.clone() for h, x in per[r].items()}, lps[r])
        while level:
            level = [c for j in level for c in forest.children[j] if c in inside]
            own = {j: lens[j] - forest.shared[j] for j in level}
            nxt: dict[int, _TreeState] = {}
            # Siblings that share the same part of one parent (a template's words, a prompt's responses)
            # batch together: their cache is the parent's broadcast, their shared activations one slice.
            by_key: dict[tuple[int, int], list[int]] = {}
            for j in level:
                by_key.setdefault((forest.parent[j], forest.shared[j]), []).append(j)
            pooled = [j for g in by_key.values() if len(g) < _SIBLING_BATCH for j in g]
            cut = [b for g in by_key.values() if len(g) >= _SIBLING_BATCH for b in cut_batches(g, own, batch_size, m.device)]
            cut += cut_batches(pooled, own, batch_size, m.device) if pooled else []
            for batch in cut:
                cs = [forest.shared[j] for j in batch]
                parents = [states[forest.parent[j]] for j in batch]
                uniform = len({(forest.parent[j], c) for j, c in zip(batch, cs, strict=True)}) == 1
                if uniform:
                    cache, width = repeated_cache(m.hf_model.config, parents[0].kv, cs[0], len(batch)), cs[0]
                else:
                    cache, width = padded_cache(m.hf_model.config, [p.kv for p in parents], cs)
                ids, tail_mask = _right_padded([tok.ids[j][c:] for j, c in zip(batch, cs, strict=True)], self.pad_id)
                mask = torch.zeros((len(batch), width + ids.shape[1]), dtype=torch.long)
                mask[:, width:] = tail_mask
                for r, c in enumerate(cs):
                    mask[r, :c] = 1
                acts = _forward_hooks(m, ids, mask, hooks, self.stop_layer, self.recorder, past=cache)
                if uniform:
                    c0, pa0 = cs[0], parents[0]
                    whole = {h: torch.cat([pa0.acts[h][:c0].unsqueeze(0).expand(len(batch), -1, -1), acts[h]], 1)
                             for h in hooks}
                    per = [{h: whole[h][r, : c0 + own[j]] for h in hooks} for r, j in enumerate(batch)]
                else:
                    per = [{h: torch.cat([pa.acts[h][:c], acts[h][r, : own[j]]]) for h in hooks}
                           for r, (j, c, pa) in enumerate(zip(batch, cs, parents, strict=True))]
                if self.logprobs:
                    known = [{p: v for p, v in pa.lp_at.items() if p < c} for pa, c in zip(parents, cs, strict=True)]
                    lps = self._logprobs([a[_FINAL_NORM_HOOK] for a in per], batch, known,
                                         [(forest.parent[j], c) for j, c in zip(batch, cs, strict=True)])
                else:
                    lps = [{}] * len(batch)
                for r, (j, c) in enumerate(zip(batch, cs, strict=True)):
                    emit(j, per[r], sum(lps[r].values()) if self.logprobs else None)
                    if forest.children[j]:
                        pkv = parents[r].kv
                        kv = self._kv(cache, r, [(width, width + own[j])])
                        nxt[j] = _TreeState([(torch.cat([pk[:, :c], k_], 1), torch.cat([pv[:, :c], v_], 1))
                                             for (pk, pv), (k_, v_) in zip(pkv, kv, strict=False)],
                                            {h: x.clone() for h, x in per[r].items()}, lps[r])
            states = nxt


def _tree_ok_once(m: LoadedModel, tok: _Tokenized, forest: _ShareForest, hooks: Sequence[str],
                  stop_layer: int | None, recorder: _HookRecorder, pad_id: int, logprobs: bool) -> bool:
    """:func:`_tree_ok`, once per model and setting (its forward code, weights, compute dtype, device, hooks
    and how they are read): whether a model handles a cache, positions and masks does not depend on the
    texts, so later shards and captures reuse the verdict."""
    from irm.models import compute_dtype

    hf = m.hf_model
    key = (type(hf).forward, sum(int(p._version) for p in hf.parameters()), str(compute_dtype(hf)), str(m.device),
           tuple(hooks), stop_layer, logprobs, recorder.native is not None and _native_hooks_enabled())
    checked = hf.__dict__.setdefault("_irm_tree_ok", {})
    if key not in checked:
        checked[key] = _tree_ok(m, tok, forest, hooks, stop_layer, recorder, pad_id, logprobs)
    return checked[key]


def _tree_ok(m: LoadedModel, tok: _Tokenized, forest: _ShareForest, hooks: Sequence[str], stop_layer: int | None,
             recorder: _HookRecorder, pad_id: int, logprobs: bool) -> bool:
    """Whether ``m`` gives a small subtree (a root, children with different shared lengths, so some rows
    have masked cache positions, and a grandchild) the activations and log-probabilities of full passes.

    A model whose forward ignores or mishandles ``past_key_values`` or the positions would otherwise give
    wrong activations silently; this costs a few short forward passes per shard.
    """
    from irm.models import float32_compute, shared_pass_check

    root = next(j for j in forest.members if forest.parent[j] < 0)
    kids = list({forest.shared[c]: c for c in forest.children[root]}.values())[:3]
    grand = [g for c in kids for g in forest.children[c]][:1]
    picked = [root, *kids, *grand]
    sub = _ShareForest.__new__(_ShareForest)
    sub.parent = {j: (forest.parent[j] if j != root else -1) for j in picked}
    sub.shared = {j: forest.shared[j] for j in picked}
    sub.children = {j: [c for c in forest.children[j] if c in picked] for j in picked}
    sub.members, sub.alone = picked, []
    via: dict[int, tuple[dict[str, Tensor], float | None]] = {}
    try:
        with float32_compute(m.hf_model):  # a model in mixed precision is checked exactly
            _TreeRunner(m, tok, hooks, stop_layer, recorder, pad_id, logprobs).run(
                sub, picked, len(picked), lambda j, a, lp: via.__setitem__(j, (a, lp)))
            full = {}
            for j in picked:
                ids = torch.tensor([tok.ids[j]])
                acts = _forward_hooks(m, ids, torch.ones_like(ids), hooks, stop_layer, recorder)
                lp = (_response_logprobs(m, acts[_FINAL_NORM_HOOK], ids, [tok.response[j]])[0]  # type: ignore[index]
                      if logprobs else None)
                full[j] = ({h: x[0] for h, x in acts.items()}, lp)
    except Exception as e:  # noqa: BLE001 - any failure means: do not share prefixes with this model
        log.warning("%s: running texts on a shared prefix's cache fails (%s: %s); capturing with full forward "
                    "passes.", m.identity.spec, type(e).__name__, e)
        return False
    for h in hooks:
        got = torch.cat([via[j][0][h] for j in picked])
        want = torch.cat([full[j][0][h] for j in picked])
        ok, err = shared_pass_check(got, want, m.hf_model, half=3e-2, relative=True)
        if not ok:
            log.warning("%s: activations at %s through a cached prefix differ from a full pass by %.2g "
                        "(relative); capturing with full forward passes.", m.identity.spec, h, err)
            return False
    if logprobs:
        got_lp = np.array([via[j][1] for j in picked])
        want_lp = np.array([full[j][1] for j in picked])
        ok, err = shared_pass_check(torch.from_numpy(got_lp), torch.from_numpy(want_lp), m.hf_model)
        if not ok:
            log.warning("%s: log-probabilities through a cached prefix differ from a full pass by %.2g; "
                        "capturing with full forward passes.", m.identity.spec, err)
            return False
    return True


def _right_padded(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    return ids, mask


def _new_cache(m: LoadedModel):
    from transformers import DynamicCache

    return DynamicCache(config=m.hf_model.config)


def _prefix_cache_ok(m: LoadedModel, tok: _Tokenized, group: tuple[int, list[int]], hooks: Sequence[str],
                     stop_layer: int | None, recorder: _HookRecorder) -> bool:
    """Whether ``m`` gives one text the same activations through a cached prefix as in a full pass.

    A model whose forward ignores or mishandles ``past_key_values`` would otherwise give wrong
    activations silently; this costs two short forward passes per shard.
    """
    from irm.models import float32_compute, shared_pass_check

    c, members = group
    ids = torch.tensor([tok.ids[members[0]]])
    with float32_compute(m.hf_model):  # a model in mixed precision is checked exactly
        full = _forward_hooks(m, ids, torch.ones_like(ids), hooks, stop_layer, recorder)
        try:
            cache = _new_cache(m)
            pre = _forward_hooks(m, ids[:, :c], torch.ones_like(ids[:, :c]), hooks, stop_layer, recorder,
                                 past=cache)
            suf = _forward_hooks(m, ids[:, c:], torch.ones_like(ids), hooks, stop_layer, recorder, past=cache)
        except Exception as e:  # noqa: BLE001 - any failure means: do not share prefixes with this model
            log.warning("%s: a cached prefix fails (%s: %s); capturing with full forward passes.",
                        m.identity.spec, type(e).__name__, e)
            return False

    for h in hooks:
        ok, err = shared_pass_check(torch.cat([pre[h], suf[h]], 1), full[h], m.hf_model, half=3e-2, relative=True)
        if not ok:
            log.warning("%s: activations at %s through a cached prefix differ from a full pass by %.2g "
                        "(relative); capturing with full forward passes.", m.identity.spec, h, err)
            return False
    return True


_FINAL_NORM_HOOK = "ln_final.hook_out"  # what the unembedding reads


def _log_softmax_at(m: LoadedModel, h: Tensor, targets: Tensor | None = None) -> Tensor:
    """Unembed final-norm outputs ``h`` [n, d]: ``log p(targets)`` [n], or the whole log-softmax [n, vocab]."""
    unembed = m.hf_model.get_output_embeddings()
    logits = unembed(h.to(device=unembed.weight.device, dtype=unembed.weight.dtype)).float()
    if targets is None:
        return torch.log_softmax(logits, -1)
    return token_logprobs(logits, targets)


def _response_logprobs(m: LoadedModel, final: Tensor, ids: Tensor, positions: list[np.ndarray],
                       shared: Tensor | None = None) -> list[float]:
    """Per row, ``sum log p(ids[p] | ids[:p])`` over ``positions`` from the final-norm output ``final``;
    the unembedding runs only at the positions that predict them.

    ``shared`` ([c, vocab]): the log-softmax at the first ``c`` positions, which every row shares (a
    prefix run once): a target predicted from there is looked up, not unembedded again. For the IRM's
    word templates that is every word's first token.
    """
    rows = torch.tensor(np.concatenate([np.full(len(p), r) for r, p in enumerate(positions)]), dtype=torch.long)
    cols = torch.from_numpy(np.concatenate(positions).astype(np.int64))
    targets = ids[rows, cols]
    lp = torch.empty(len(cols), dtype=torch.float64)
    in_shared = (cols - 1 < shared.shape[0]) if shared is not None else torch.zeros(len(cols), dtype=torch.bool)
    if in_shared.any():
        assert shared is not None
        lp[in_shared] = shared[cols[in_shared] - 1, targets[in_shared].to(shared.device)].double().cpu()
    rest = ~in_shared
    if rest.any():
        lp[rest] = _log_softmax_at(m, final[rows[rest], cols[rest] - 1], targets[rest]).double().cpu()
    sums = torch.zeros(len(positions), dtype=torch.float64).index_add_(0, rows, lp)
    if not torch.isfinite(sums).all():
        raise FloatingPointError(f"Non-finite log-probabilities from {m.identity.spec!r}; check weights and dtype.")
    return sums.tolist()


ENV_NATIVE_HOOKS = "IRM_NATIVE_HOOKS"


def _native_hooks_enabled() -> bool:
    import os

    return os.environ.get(ENV_NATIVE_HOOKS, "1").strip().lower() not in ("0", "false", "no", "off")


def _native_modules(bridge, hooks: Sequence[str]) -> dict[str, torch.nn.Module] | None:
    """The HF module whose output each hook point sees, or None if a hook is not such a point.

    A TransformerBridge component applies its ``hook_out`` to the output of the HF module it wraps;
    ``blocks.{l}.hook_resid_post`` is the ``hook_out`` of block ``l`` (the HF decoder layer),
    ``ln_final.hook_out`` that of the final norm, ``blocks.{l}.hook_mlp_out`` that of the MLP. Hooks
    inside a component (attention scores, ``hook_resid_mid``, ...) have no HF module of their own.
    """
    from irm.models import bridge_original

    owner: dict[int, torch.nn.Module] = {}
    for mod in bridge.modules():
        point = mod._modules.get("hook_out")
        if point is not None and bridge_original(mod) is not None:
            owner[id(point)] = mod
    points = bridge.hook_dict
    out: dict[str, torch.nn.Module] = {}
    for h in hooks:
        comp = owner.get(id(points.get(h)))
        if comp is None:
            return None
        orig = bridge_original(comp)
        while (inner := bridge_original(orig)) is not None:  # a wrapper of a wrapper
            orig = inner
        out[h] = orig
    return out


class _HookRecorder:
    """Forward hooks attached once per shard that record one batch's activations per forward pass.

    ``bridge.run_with_hooks`` resolves every hook name through ``bridge.hook_dict``, which rebuilds
    TransformerLens's alias map on each access (~20 ms for SmolLM2): with every layer hooked that
    cost ~0.6 s per batch, as much as the forward itself. Here the map is built once per shard.

    **Native hooks.** Where every hook is the output of an HF module (``hook_resid_post``,
    ``ln_final.hook_out``, ``hook_mlp_out``, ``hook_attn_out``, see :func:`_native_modules`), the
    forward pass runs the HF model itself (:func:`irm.models.unwrapped`) with plain PyTorch forward
    hooks on those modules: the bridge's wrappers (its Python hook points, its re-implemented
    attention) cost SmolLM2 13-43% of a capture pass on a CPU. The bridge still names and validates
    the hooks, and its hooks stay attached: once per model and set of hooks the two are compared on a
    left-padded batch (float32, to 1e-3 of the largest value; they agree to about 3e-5), and where they
    differ, or the HF pass fails, the capture warns and goes through the bridge. ``IRM_NATIVE_HOOKS=0``
    turns native hooks off.
    """

    def __init__(self, m: LoadedModel, hooks: Sequence[str]) -> None:
        self.m, self.hooks = m, list(hooks)
        self.acts: dict[str, Tensor] = {}
        self.width = 0
        self._points: list[Any] = []
        self.native: dict[str, torch.nn.Module] | None = None

    def __enter__(self) -> _HookRecorder:
        bridge = self.m.bridge
        points = bridge.hook_dict
        # A level of our own, so leaving removes only these hooks (not ones the caller added).
        self._level = bridge.context_level + 1
        try:
            for h in self.hooks:
                bridge.check_hooks_to_add(h)  # a gated-off hook point says which set_use_* to call
                points[h].add_hook(self._make_fn(h), dir="fwd", level=self._level)
                self._points.append(points[h])
        except BaseException:
            self.__exit__()
            raise
        if _native_hooks_enabled():
            self.native = _native_modules(bridge, self.hooks)
            if self.native is not None and any(v is False for v in self.verdicts()):
                self.native = None  # checked before: they differ
        return self

    def verdicts(self) -> list[bool | None]:
        """Per hook, whether native hooks on these modules were found to match the bridge (None: unchecked)."""
        assert self.native is not None
        cache = self.m.hf_model.__dict__.setdefault("_irm_native_hooks", {})
        return [cache.get((h, id(mod))) for h, mod in self.native.items()]

    def __exit__(self, *exc: object) -> None:
        for point in self._points:
            point.remove_hooks("fwd", level=self._level)
        self._points = []

    def record(self, name: str, x: Tensor) -> None:
        if x.dim() < 3 or x.shape[1] != self.width:
            raise ValueError(f"Hook {name!r} gives shape {tuple(x.shape)}; position rules need "
                             "[batch, pos, ...] activations (e.g. hook_resid_post, hook_mlp_out).")
        self.acts[name] = x.detach().reshape(x.shape[0], x.shape[1], -1).float().cpu()
        if len(self.acts) == len(self.hooks):
            # Every hook has fired: later layers, the final norm and the unembedding are not needed
            # (stop_at_layer cannot skip them when the last layer is hooked).
            raise _StopForward

    def _make_fn(self, name: str):
        def fn(x: Tensor, hook=None):
            self.record(name, x)
            return x

        return fn


def _bridge_positions(mask: Tensor, n: int) -> Tensor:
    """The ``position_ids`` TransformerBridge.forward gives the last ``n`` tokens under ``mask`` (which
    spans a cached prefix too): a row with a pad before a real token counts only its real tokens, any
    other row keeps ``arange``."""
    mask = mask.long()
    derived = mask.cumsum(-1) - 1
    derived.masked_fill_(mask == 0, 1)
    arange = torch.arange(mask.shape[1]).expand_as(derived)
    needs = ((derived != arange) & (mask != 0)).any(dim=1, keepdim=True)
    return torch.where(needs, derived, arange)[:, mask.shape[1] - n:]


def _native_pass(m: LoadedModel, ids: Tensor, mask: Tensor, recorder: _HookRecorder, past=None) -> None:
    """One forward pass of the HF model (no bridge wrappers) with forward hooks on the modules of
    ``recorder.native``; the activations land in ``recorder.acts`` as the bridge's hooks would put them."""
    from irm.models import unwrapped

    assert recorder.native is not None
    hf, dev = m.hf_model, m.device
    handles = []

    def hook(name: str):
        def fn(module, args, out):
            recorder.record(name, out[0] if isinstance(out, tuple) else out)

        return fn

    kw: dict[str, Any] = {"use_cache": past is not None}
    if past is not None:
        kw["past_key_values"] = past
    with unwrapped(hf):
        try:
            for h, mod in recorder.native.items():
                handles.append(mod.register_forward_hook(hook(h)))
            hf(input_ids=ids.to(dev), attention_mask=mask.to(dev),
               position_ids=_bridge_positions(mask, ids.shape[1]).to(dev), **kw)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()


def _bridge_pass(m: LoadedModel, ids: Tensor, mask: Tensor, stop_layer: int | None, past=None) -> None:
    kw = {} if past is None else {"past_key_values": past, "use_cache": True}
    try:
        m.bridge(ids.to(m.device), attention_mask=mask.to(m.device), return_type=None,
                 stop_at_layer=stop_layer, **kw)
    except _StopForward:
        pass


def _native_check(m: LoadedModel, ids: Tensor, mask: Tensor, stop_layer: int | None,
                  recorder: _HookRecorder) -> bool:
    """Whether native hooks give this model the bridge's activations; decided once per model and hook
    (cached on the model). Compares a two-row batch built from the first row of ``ids``: the row
    itself and, left-padded, its first half (so positions under padding are checked as well)."""
    from irm.models import float32_compute, shared_pass_check

    if all(v is True for v in recorder.verdicts()):
        return True
    native = recorder.native
    assert native is not None
    cache = m.hf_model.__dict__.setdefault("_irm_native_hooks", {})
    verdicts: dict[str, bool] = {}
    toks = ids[0][mask[0, -ids.shape[1]:].bool()]
    if toks.numel() == 0:
        toks = ids[0]
    n, k = toks.numel(), toks.numel() // 2
    pad = int(toks[0])  # the pad positions are masked, so any id will do
    rows = torch.stack([toks, torch.cat([torch.full((n - max(k, 1),), pad, dtype=toks.dtype), toks[:max(k, 1)]])])
    rmask = torch.ones_like(rows)
    rmask[1, : n - max(k, 1)] = 0
    width = recorder.width
    try:
        with float32_compute(m.hf_model):  # the check is exact where a model computes in mixed precision
            recorder.acts, recorder.width = {}, n
            _bridge_pass(m, rows, rmask, stop_layer)
            want = recorder.acts
            recorder.acts = {}
            try:
                _native_pass(m, rows, rmask, recorder)
            except Exception as e:  # noqa: BLE001 - any failure means: use the bridge for this model
                log.warning("%s: a forward pass with native hooks fails (%s: %s); capturing through the "
                            "TransformerBridge.", m.identity.spec, type(e).__name__, e)
                cache.update({(h, id(mod)): False for h, mod in native.items()})
                return False
            got = recorder.acts
    finally:
        recorder.acts, recorder.width = {}, width
    valid = rmask.bool()
    for h in recorder.hooks:
        if h not in want or h not in got:
            verdicts[h] = False
            log.warning("%s: hook %s did not fire in a native pass; capturing through the TransformerBridge.",
                        m.identity.spec, h)
            continue
        ok, err = shared_pass_check(got[h][valid], want[h][valid], m.hf_model, half=3e-2, relative=True)
        verdicts[h] = ok
        if not ok:
            log.warning("%s: %s from the HF module's output differs from the bridge's hook by %.2g (relative); "
                        "capturing through the TransformerBridge.", m.identity.spec, h, err)
    cache.update({(h, id(mod)): verdicts[h] for h, mod in native.items()})
    return all(verdicts.values())


def _forward_hooks(m: LoadedModel, ids: Tensor, mask: Tensor, hooks: Sequence[str], stop_layer: int | None,
                   recorder: _HookRecorder, past=None) -> dict[str, Tensor]:
    """The hooks' activations of one batch; with ``past`` (a key/value cache of the earlier positions,
    which this pass extends) ``ids`` are the later positions and ``mask`` covers all of them."""
    if recorder.native is not None and not _native_check(m, ids, mask, stop_layer, recorder):
        recorder.native = None
    recorder.acts, recorder.width = {}, ids.shape[1]
    if recorder.native is not None:
        _native_pass(m, ids, mask, recorder, past)
    else:
        _bridge_pass(m, ids, mask, stop_layer, past)
    acts = recorder.acts
    missing = [h for h in hooks if h not in acts]
    if missing:
        raise RuntimeError(f"Hooks {missing} never fired during the forward pass; they may be gated off "
                           "in this model (see TransformerBridge.set_use_* setters).")
    valid = mask[:, -ids.shape[1]:].bool()
    for h, x in acts.items():
        if not torch.isfinite(x[valid]).all():
            raise FloatingPointError(f"Non-finite activations at hook {h!r} of {m.identity.spec!r}; "
                                     "check the model weights and dtype (fp16 overflows are common).")
    return acts


def _commit_shard(shard_dir: Path, i: int, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    from irm.core.constants import STORE_SHARD_DONE_FMT, STORE_SHARD_FMT

    path = shard_dir / STORE_SHARD_FMT.format(i)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)
    rows = int(tensors["index/text"].shape[0])
    write_json_atomic(shard_dir / STORE_SHARD_DONE_FMT.format(i), {"rows": rows, "sha256": file_sha256(path)})

