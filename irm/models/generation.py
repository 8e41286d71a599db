"""Sampling completions: batched, left-padded generation where each row draws from its own random
stream (:class:`RowSampler`), so a completion does not depend on its batch; a memo of what a run has
sampled already (:class:`GenerationMemo`)."""

from __future__ import annotations

import copy
import hashlib
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from irm.core.log import get_logger, progress
from irm.models.compute import compute_dtype, unwrapped

__all__ = ["Generations", "GenerationMemo", "generate", "RowSampler", "text_key"]

log = get_logger(__name__)

@dataclass
class Generations:
    """Completions of one model: one row per (prompt, sample), prompts repeated ``n_samples`` times.

    ``prompt_ids`` / ``completion_ids`` are the exact token ids (no padding; a completion keeps its
    end-of-sequence token when it stopped on one), so log-probabilities can be recomputed on exactly
    what was sampled instead of on a re-tokenisation of the decoded text.
    """

    prompts: list[str]
    completions: list[str]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    eos_ids: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    def content_ids(self) -> list[list[int]]:
        """Completion ids without the final end-of-sequence token (what repetition is measured on)."""
        return [c[:-1] if c and c[-1] in self.eos_ids else c for c in self.completion_ids]


def _eos_ids(model, tokenizer) -> tuple[int, ...]:
    ids: list[int] = []
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    for x in [tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])]:
        if x is not None and int(x) not in ids:
            ids.append(int(x))
    return tuple(ids)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 20,
    n_samples_per_prompt: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    desc: str = "generate",
    memo: GenerationMemo | None = None,
) -> Generations:
    """Sample completions, left-padded and batched, with attention masks; reproducible from ``seed``.

    Every completion has its own random stream, seeded by ``(seed, its prompt, which sample of that
    prompt it is)``, and draws its tokens by the Gumbel-max trick on that stream (:class:`RowSampler`).
    So ``batch_size`` is a speed setting only: a prompt gets the same completion whatever batch or
    place in the list it has (up to float noise in the padded forward pass); two models given the same prompts use the same
    streams (identical models give identical samples, and a base/tuned comparison shares its random
    numbers); and the caller's global RNG is left untouched. ``temperature == 0`` means greedy
    decoding. The sampling settings are passed as a fresh ``GenerationConfig``, so a checkpoint's own
    ``generation_config`` (e.g. a repetition penalty) cannot silently change what is measured.

    ``memo`` (a :class:`GenerationMemo`): completions of the same model, prompt, sample number, seed and
    sampling settings that it holds are reused (cut to ``max_new_tokens``) or, if shorter and unfinished,
    continued from where they stopped instead of sampled again from the start.

    >>> gens = generate(model, tok, ["The movie was"], max_new_tokens=8, n_samples_per_prompt=4)
    >>> len(gens), gens.completions[0]
    """
    from transformers import GenerationConfig

    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a list of strings, got the string {prompts[:40]!r}; wrap it in a list.")
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt to generate from.")
    if max_new_tokens < 1 or n_samples_per_prompt < 1 or batch_size < 1:
        raise ValueError(
            f"max_new_tokens ({max_new_tokens}), n_samples_per_prompt ({n_samples_per_prompt}) and "
            f"batch_size ({batch_size}) must all be >= 1."
        )
    if tokenizer.padding_side != "left":
        # Right padding would put pad tokens between a prompt and its completion.
        raise ValueError(
            f"generate needs a left-padding tokenizer, got padding_side={tokenizer.padding_side!r}; "
            "load it with irm.models.load_tokenizer (which sets it) or set tokenizer.padding_side = 'left'."
        )
    expanded = [p for p in prompts for _ in range(n_samples_per_prompt)]
    eos = _eos_ids(model, tokenizer)
    greedy = temperature == 0
    if not greedy and not (temperature > 0 and top_k >= 0 and 0 < top_p <= 1):
        raise ValueError(f"Sampling needs temperature > 0 (or 0 for greedy), top_k >= 0 (0: off) and 0 < top_p <= 1; "
                         f"got temperature={temperature}, top_k={top_k}, top_p={top_p}.")
    # Sampling runs as "greedy" over Gumbel-perturbed scores (RowSampler), so HF's own sampling warpers
    # and its one batch-wide multinomial draw are off.
    gen_cfg = GenerationConfig(
        max_new_tokens=int(max_new_tokens), use_cache=True, do_sample=False,
        temperature=None, top_k=None, top_p=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=list(eos),
        bos_token_id=tokenizer.bos_token_id,
    )
    # A completion's random stream: (seed, its prompt, which sample of that prompt it is), so neither its
    # batch nor its place in the list changes it, and repeated prompts still get independent samples.
    seen: dict[str, int] = {}
    keys = []
    for p in expanded:
        seen[p] = seen.get(p, -1) + 1
        keys.append((seed, text_key(p), seen[p]))
    device = next(model.parameters()).device
    n = len(expanded)
    prompt_ids: list[list[int]] = [[] for _ in range(n)]
    comps: list[list[int] | None] = [None] * n
    known: dict[int, list[int]] = {}  # row -> the tokens a memo holds, to be continued
    settings = (0.0 if greedy else float(temperature), int(top_k), float(top_p), eos)
    memo_keys = [(settings, key[0], p, key[2]) for key, p in zip(keys, expanded, strict=True)]
    if memo is not None:
        for r, hit in enumerate(memo.lookup(model, tokenizer, memo_keys)):
            if hit is None:
                continue
            prompt_ids[r], done = hit
            if len(done) >= max_new_tokens or (done and done[-1] in eos):
                comps[r] = done[:max_new_tokens]
            else:  # unfinished: every step of it drew once from the row's stream
                known[r] = done
    # Jobs: batches of rows sampled from their prompt, then of rows continued after the same number of steps.
    fresh = [r for r in range(n) if comps[r] is None and r not in known]
    jobs = [(0, fresh[i : i + batch_size]) for i in range(0, len(fresh), batch_size)]
    by_steps: dict[int, list[int]] = {}
    for r, done in known.items():
        by_steps.setdefault(len(done), []).append(r)
    for steps, rows in sorted(by_steps.items()):
        jobs += [(steps, rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    was_training = model.training
    model.eval()
    try:
        with unwrapped(model):  # no TransformerBridge wrappers: generation needs no hook
            for steps, rows in progress(jobs, desc=desc, unit="batch"):
                if steps == 0:
                    # Same tokenisation as trl's plain-text prompts (the tokenizer's default special tokens).
                    enc = tokenizer([expanded[r] for r in rows], return_tensors="pt", padding=True)
                    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
                    cfg = gen_cfg
                else:
                    ids, mask = _left_padded([prompt_ids[r] + known[r] for r in rows], tokenizer.pad_token_id, device)
                    cfg = copy.deepcopy(gen_cfg)
                    cfg.max_new_tokens = int(max_new_tokens) - steps
                kw = {} if greedy else {"logits_processor": RowSampler.processors(
                    [keys[r] for r in rows], device, temperature=temperature, top_k=top_k, top_p=top_p, skip=steps)}
                seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg, **kw)
                width = ids.shape[1]
                for i, r in enumerate(rows):
                    comp = seqs[i, width:].tolist()
                    # Cut after the first end-of-sequence token; what follows is padding.
                    for j, t in enumerate(comp):
                        if t in eos:
                            comp = comp[: j + 1]
                            break
                    if steps == 0:
                        prompt_ids[r] = ids[i][mask[i].bool()].tolist()
                        comps[r] = comp
                    else:
                        comps[r] = known[r] + comp
    finally:
        model.train(was_training)
    completion_ids = [c if c is not None else [] for c in comps]
    if memo is not None:
        memo.store(model, tokenizer, memo_keys, prompt_ids, completion_ids)
    out = Generations(list(expanded), [], prompt_ids, completion_ids, eos)
    out.completions = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
    return out


def _left_padded(rows: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


class GenerationMemo:
    """Completions already sampled, for :func:`generate` to reuse or continue.

    A run samples the same prompts more than once: the evaluation draws ``max_new_tokens`` (20) tokens
    per held-out prompt, the contrastive stage 24 from the same prompts with the same seed, so from the
    same per-row random streams (:class:`RowSampler`). Given a memo, ``generate`` cuts a completion the
    memo holds to its ``max_new_tokens``, and continues a shorter unfinished one (its context is the
    prompt and the tokens so far; its stream skips the draws those steps made), instead of sampling
    from the start. The tokens are those a fresh call samples, up to float noise of the forward pass
    (the known tokens run as one prefill instead of step by step), as for any change of batch.

    Entries belong to one model object and are dropped when its weights change (any in-place update,
    e.g. an optimizer step), its compute dtype changes or another tokenizer is used; a key holds the
    prompt, the sample number, the seed and the sampling settings. A memo lives as long as a run.
    """

    def __init__(self) -> None:
        self._models: dict[int, tuple[Any, tuple, dict]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _state(model, tokenizer) -> tuple:
        version = sum(int(p._version) for p in model.parameters())
        return (version, str(compute_dtype(model)), str(next(model.parameters()).device),
                getattr(tokenizer, "name_or_path", ""), len(tokenizer))

    def _entries(self, model, tokenizer) -> dict:
        state = self._state(model, tokenizer)
        with self._lock:
            slot = self._models.get(id(model))
            if slot is None or slot[0]() is not model or slot[1] != state:
                slot = (weakref.ref(model), state, {})
                self._models[id(model)] = slot
            return slot[2]

    def lookup(self, model, tokenizer, keys: Sequence[tuple]) -> list[tuple[list[int], list[int]] | None]:
        """(prompt ids, completion ids) per key, or None."""
        entries = self._entries(model, tokenizer)
        return [entries.get(k) for k in keys]

    def store(self, model, tokenizer, keys: Sequence[tuple], prompt_ids: Sequence[list[int]],
              completion_ids: Sequence[list[int]]) -> None:
        """Remember completions (a longer one replaces a shorter one of the same key)."""
        entries = self._entries(model, tokenizer)
        for k, p, c in zip(keys, prompt_ids, completion_ids, strict=True):
            old = entries.get(k)
            if old is None or len(c) > len(old[1]):
                entries[k] = (list(p), list(c))

    def __len__(self) -> int:
        return sum(len(slot[2]) for slot in self._models.values())


def text_key(text: str) -> int:
    """A stable 64-bit integer of ``text`` (a random-stream key; Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


class RowSampler:
    """A logits processor that samples each batch row from its own random stream (Gumbel-max).

    ``argmax(scores + g)`` with ``g`` i.i.d. standard Gumbel noise is a draw from ``softmax(scores)``.
    The noise of a row comes from a ``torch.Generator`` seeded by that row's key (e.g. ``(seed,
    completion index)``), one vocabulary-sized draw per step, so what a row samples does not depend on
    which other rows share its batch, or how many. Used after temperature, top-k and top-p filtering
    (:meth:`processors`), under ``do_sample=False``.
    """

    def __init__(self, keys: Sequence[tuple[int, ...]], device, *, skip: int = 0) -> None:
        device = torch.device(device)
        self.gens = []
        for key in keys:
            g = torch.Generator(device=device)
            g.manual_seed(int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0] >> 1))
            self.gens.append(g)
        self.skip = int(skip)  # steps already drawn (a continued completion): replayed on the first call

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if scores.shape[0] != len(self.gens):
            raise RuntimeError(f"RowSampler was made for {len(self.gens)} rows but got scores for {scores.shape[0]}.")
        for g in self.gens if self.skip else ():
            for _ in range(self.skip):  # one vocabulary-sized draw per step, as the steps themselves made
                torch.rand(scores.shape[1], generator=g, device=scores.device, dtype=torch.float32)
        self.skip = 0
        noise = torch.stack([torch.rand(scores.shape[1], generator=g, device=scores.device, dtype=torch.float32)
                             for g in self.gens])
        gumbel = -torch.log(-torch.log(noise.clamp_min(torch.finfo(torch.float32).tiny)))
        return scores.float() + gumbel

    @classmethod
    def processors(cls, keys: Sequence[tuple[int, ...]], device, *, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, skip: int = 0):
        """Temperature, top-k, top-p (HF's own warpers, in HF's order), then the per-row Gumbel draw
        (``skip``: the streams start after that many steps' draws)."""
        from transformers import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        procs: list[Any] = []
        if temperature != 1.0:
            procs.append(TemperatureLogitsWarper(float(temperature)))
        if top_k:
            procs.append(TopKLogitsWarper(int(top_k)))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(float(top_p)))
        return LogitsProcessorList([*procs, cls(keys, device, skip=skip)])
