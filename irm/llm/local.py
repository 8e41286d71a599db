"""``kind = "local"``: a transformers chat model in this process (default: the embedded
SmolLM2-135M-Instruct), chat template, greedy at ``temperature == 0``, seeded, batched with a shared
prompt prefix computed once."""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from irm.core.log import get_logger
from irm.llm.base import Message, check_messages, check_params, register_llm

__all__ = ["LocalChatLLM"]

log = get_logger(__name__)

_MIN_SHARED_PROMPT = 16  # shared leading tokens of a call's prompts worth a cached prefix


def _common_prefix(seqs: Sequence[Sequence[int]]) -> list[int]:
    """The longest common prefix of ``seqs``, leaving every sequence at least one token of its own."""
    first = seqs[0]
    n = min(len(x) for x in seqs) - 1
    k = 0
    while k < n and all(x[k] == first[k] for x in seqs):
        k += 1
    return list(first[:k])


@register_llm("local")
class LocalChatLLM:
    """A causal LM from :func:`irm.models.load_model` used as a chat model.

    ``model`` is a model spec (default: the embedded SmolLM2-135M-Instruct) or an already
    :class:`~irm.models.LoadedModel` (so a pipeline reuses the base model it has in memory).
    The tokenizer's chat template renders the messages; a tokenizer without one gets a plain
    ``role: content`` transcript. When sampling, each prompt draws from its own random stream keyed
    by ``(seed, prompt)`` (:class:`irm.pair.evaluate.RowSampler`), so a reply depends only on its messages
    and seed, never on how the prompts are batched or on the caller's global RNG.

    >>> llm = LocalChatLLM("smollm2-135m-instruct")
    >>> llm.complete([{"role": "user", "content": "Name a colour."}], max_tokens=8)
    """

    def __init__(
        self,
        model: Any = None,
        *,
        device: str | None = "cpu",
        dtype: str = "float32",
        batch_size: int = 32,
        name: str | None = None,
    ) -> None:
        from irm.core.constants import DEFAULT_MODEL
        from irm.models import LoadedModel, load_model

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if model is None:
            model = DEFAULT_MODEL
        if isinstance(model, LoadedModel):
            self.model = model
        elif isinstance(model, (str, os.PathLike)):
            self.model = load_model(str(model), device=device, dtype=dtype)
        else:
            raise TypeError(
                f"model must be a model spec (str) or an irm.models.LoadedModel, got {type(model).__name__}"
            )
        ident = self.model.identity
        self.batch_size = int(batch_size)
        self.name = name or f"local:{ident.spec}"
        # The weights fingerprint makes the cache forget replies of a model that was rebuilt or retuned.
        # Mixed precision changes replies: its cached replies are kept apart from float32 ones.
        self.cache_id = f"local:{ident.fingerprint or ident.checkpoint}" + (
            f":{ident.compute_dtype}" if getattr(ident, "compute_dtype", None) else "")
        # Log-probabilities at the end of recently generated-from prompts: the first step of generation
        # computes exactly what choice_logprobs asks for, so asking for a label's probabilities after
        # generating it costs no second pass over the (often long, few-shot) prompt.
        self._prompt_end_lp: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._prompt_end_lp_max = 256

    def render(self, messages: list[Message]) -> str:
        """The prompt text the model sees for ``messages`` (chat template + generation prompt)."""
        tok = self.model.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def complete(
        self, messages: list[Message], *, max_tokens: int = 256, temperature: float = 0.0, seed: int = 0
    ) -> str:
        return self.complete_many([messages], max_tokens=max_tokens, temperature=temperature, seed=seed)[0]

    def complete_many(
        self, batch: Sequence[list[Message]], *, max_tokens: int = 256, temperature: float = 0.0, seed: int = 0
    ) -> list[str]:
        from irm.models import unwrapped

        with unwrapped(self.model.hf_model):  # no TransformerBridge wrappers: generation needs no hook
            return self._complete_many(batch, max_tokens=max_tokens, temperature=temperature, seed=seed)

    def complete_words(self, batch: Sequence[list[Message]], *, ban: Sequence[str | None] | None = None,
                       max_words: int = 3, max_tokens: int = 12, temperature: float = 0.0, seed: int = 0) -> list[str]:
        """Replies decoded under :class:`_WordGrammar` (see :func:`irm.llm.complete_words`): 1 to
        ``max_words`` words of letters, ending where the model would go on with anything else;
        ``ban[i]`` cannot be spelled as reply ``i``."""
        from irm.models import unwrapped

        bans = list(ban) if ban is not None else [None] * len(batch)
        if len(bans) != len(batch):
            raise ValueError(f"ban has {len(bans)} entries for {len(batch)} conversations")
        with unwrapped(self.model.hf_model):
            return self._complete_many(batch, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                       words=(int(max_words), bans))

    def _complete_many(self, batch: Sequence[list[Message]], *, max_tokens: int, temperature: float,
                       seed: int, words: tuple[int, list[str | None]] | None = None) -> list[str]:
        from transformers import GenerationConfig

        check_params(max_tokens, temperature, seed)
        texts = [self.render(check_messages(m)) for m in batch]
        if not texts:
            return []
        hf, tok = self.model.hf_model, self.model.tokenizer
        n_ctx = int(getattr(hf.config, "max_position_embeddings", 0) or 0)
        greedy = temperature == 0
        eos = tok.eos_token_id
        # Sampling is a Gumbel-max draw per prompt from its own stream (irm.pair.evaluate.RowSampler), keyed by
        # (seed, prompt): a reply does not depend on the batch it was asked in, which the reply cache
        # (keyed by messages and seed) relies on.
        gen_cfg = GenerationConfig(
            max_new_tokens=int(max_tokens), do_sample=False, use_cache=True,
            output_logits=True, return_dict_in_generate=True, temperature=None, top_k=None, top_p=None,
            pad_token_id=tok.pad_token_id, eos_token_id=eos,
        )
        from irm.models.generation import text_key

        keys = [(seed, text_key(t), 0) for t in texts]
        sampler = None if greedy else float(temperature)
        # The chat template already holds the special tokens (BOS, <|im_start|>...).
        ids_all = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        longest = max(len(x) for x in ids_all)
        if n_ctx and longest + max_tokens > n_ctx:
            raise ValueError(
                f"{self.name}: a prompt of {longest} tokens plus max_tokens={max_tokens} exceeds the "
                f"model's context of {n_ctx} tokens; shorten the messages or lower max_tokens."
            )
        from irm.core.threads import ModelThreads, side_by_side_enabled
        from irm.models import compute_dtype

        mixed = compute_dtype(hf) != hf.dtype  # set_compute_dtype: the prefix check runs in float32
        prefix = _common_prefix(ids_all) if len(texts) > 1 else []
        cache = self._prefill(prefix) if len(prefix) >= _MIN_SHARED_PROMPT else None
        # Batches of prompts of similar length (longest first), so little of a batch is padding. On a CPU
        # with two or more threads, two batches run at once, one thread each (irm.core.threads): a generation
        # step of a small model uses one core better than two (1.5-1.7x the throughput, bench_threads.py).
        side = len(texts) > 1 and side_by_side_enabled([self.model, self.model], distinct=False)
        n_chunks = -(-len(texts) // self.batch_size)
        n_chunks += side and n_chunks % 2
        order = sorted(range(len(texts)), key=lambda i: (-len(ids_all[i]), i))
        chunks = [c.tolist() for c in np.array_split(np.asarray(order), n_chunks)]
        out: list[str | None] = [None] * len(texts)
        step = 2 if side else 1
        with ModelThreads([self.model] * step, enabled=side, distinct=False) as mt:
            for r0 in range(0, len(chunks), step):
                group = list(range(r0, min(r0 + step, len(chunks))))

                def run(c: int, shared):
                    idx = chunks[c]
                    grammar = None if words is None else _WordGrammar(
                        self._vocab_classes(), tok, words[0], [words[1][i] for i in idx], eos)
                    args = ([ids_all[i] for i in idx], gen_cfg, [keys[i] for i in idx], sampler)
                    if shared is not None:
                        return self._generate(*args, shared, len(prefix), grammar=grammar)
                    return self._generate(*args, grammar=grammar)

                results = mt.map([lambda c=c, shared=cache: run(c, shared) for c in group])
                if r0 == 0 and cache is not None:  # once per call: the cached prefix against a plain pass
                    first = ids_all[chunks[0][0]]
                    if not (self._prefix_ok_in_float32(first, prefix, gen_cfg) if mixed
                            else self._prefix_ok(first, results[0][0].logits[0][0])):
                        cache = None
                        results = mt.map([lambda c=c: run(c, None) for c in group])
                for c, (res, width) in zip(group, results, strict=True):
                    idx = chunks[c]
                    self._remember_prompt_ends([texts[i] for i in idx], res.logits[0])
                    replies = tok.batch_decode(res.sequences[:, width:], skip_special_tokens=True)
                    for i, reply in zip(idx, replies, strict=True):
                        out[i] = reply.strip()
        return [x if x is not None else "" for x in out]

    def _generate(self, chunk_ids: list[list[int]], gen_cfg, keys: list[tuple[int, int, int]],
                  temperature: float | None, cache=None, n_prefix: int = 0, grammar: _WordGrammar | None = None):
        """``hf.generate`` on one batch: left-padded prompts, or with ``cache`` (the key/value cache of
        the first ``n_prefix`` tokens, which every prompt shares) [prefix, pads, rest] rows whose
        positions skip the pads, so only the rest is run. ``temperature`` None is greedy, else each row
        samples from the stream of its key. Returns the output and the input width."""
        import copy

        import torch

        from irm.models.generation import RowSampler

        hf, dev = self.model.hf_model, self.model.device
        pad = self.model.tokenizer.pad_token_id
        rest = [x[n_prefix:] for x in chunk_ids]
        w = max(len(x) for x in rest)
        ids = torch.full((len(rest), n_prefix + w), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (full, tail) in enumerate(zip(chunk_ids, rest, strict=True)):
            ids[r, :n_prefix], mask[r, :n_prefix] = torch.tensor(full[:n_prefix], dtype=torch.long), 1
            ids[r, n_prefix + w - len(tail):], mask[r, n_prefix + w - len(tail):] = torch.tensor(tail), 1
        kw = {}
        if cache is not None:
            past = copy.deepcopy(cache)  # generation appends to the cache it is given
            if len(rest) > 1:
                past.batch_repeat_interleave(len(rest))
            kw["past_key_values"] = past
        procs = []
        if grammar is not None:  # the grammar masks first, so a sampler draws only among allowed tokens
            grammar.width = ids.shape[1]
            procs.append(grammar)
        if temperature is not None:
            procs += list(RowSampler.processors(keys, dev, temperature=temperature))
        if procs:
            from transformers import LogitsProcessorList

            kw["logits_processor"] = LogitsProcessorList(procs)
        with torch.no_grad():
            res = hf.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=gen_cfg, **kw)
        return res, ids.shape[1]

    def _vocab_classes(self) -> _VocabClasses:
        if getattr(self, "_vocab", None) is None:
            self._vocab = _VocabClasses(self.model.tokenizer)
        return self._vocab

    def _prefill(self, prefix: list[int]):
        """The key/value cache of ``prefix`` (the start every prompt of a call shares: system prompt,
        instructions, few-shot examples), computed once per call."""
        import torch
        from transformers import DynamicCache

        hf, dev = self.model.hf_model, self.model.device
        cache = DynamicCache(config=hf.config)
        try:
            with torch.no_grad():
                hf.base_model(input_ids=torch.tensor([prefix], device=dev), past_key_values=cache, use_cache=True)
        except Exception as e:  # noqa: BLE001 - a model without a usable cache: no sharing
            log.warning("%s: cannot cache the shared prompt prefix (%s: %s); generating without it.",
                        self.name, type(e).__name__, e)
            return None
        return cache

    def _prefix_ok_in_float32(self, ids: list[int], prefix: list[int], gen_cfg) -> bool:
        """:meth:`_prefix_ok` for a model in mixed precision: the prefix cache and one generation step
        redone in float32 (:func:`irm.models.float32_compute`), so the check stays exact."""
        import copy

        from irm.models import float32_compute

        one = copy.deepcopy(gen_cfg)
        one.max_new_tokens = 1
        with float32_compute(self.model.hf_model):
            cache = self._prefill(prefix)
            if cache is None:
                return False
            res, _ = self._generate([ids], one, [(0, 0, 0)], None, cache, len(prefix))
            return self._prefix_ok(ids, res.logits[0][0])

    def _prefix_ok(self, ids: list[int], first_logits) -> bool:
        """The first generated step through the shared-prefix cache against a plain forward pass of the
        same prompt (once per call): a model that mishandles the cache falls back to plain batches."""
        import torch

        hf, dev = self.model.hf_model, self.model.device
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([ids], device=dev), logits_to_keep=1).logits[0, -1]
        from irm.models import shared_pass_check

        want = torch.log_softmax(logits.float(), -1)
        got = torch.log_softmax(first_logits.float().to(want.device), -1)
        ok, err = shared_pass_check(got, want, hf)
        if not ok:
            log.warning("%s: generation through the shared prompt prefix differs from a plain pass (%.2g); "
                        "generating without it.", self.name, err)
            return False
        return True

    def choice_logprobs(self, batch: Sequence[list[Message]], choices: Sequence[str]) -> np.ndarray:
        """Log-probability of each choice's first token as the reply's first token (see
        :func:`choice_logprobs`); left-padded batches of ``batch_size``."""
        from irm.models import unwrapped

        with unwrapped(self.model.hf_model):
            return self._choice_logprobs(batch, choices)

    def _choice_logprobs(self, batch: Sequence[list[Message]], choices: Sequence[str]) -> np.ndarray:
        import torch

        tok = self.model.tokenizer
        first = []
        for c in choices:
            ids = tok(c, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"choice {c!r} tokenizes to nothing")
            first.append(ids[0])
        if len(set(first)) != len(first):
            raise ValueError(f"choices {list(choices)!r} share their first token; pick choices that differ "
                             "in their first token (e.g. '1' and '0').")
        texts = [self.render(check_messages(m)) for m in batch]
        hf, dev = self.model.hf_model, self.model.device
        out = np.zeros((len(texts), len(first)))
        todo = []
        for i, t in enumerate(texts):
            if t in self._prompt_end_lp:  # generated from moments ago: the first step's log-probabilities
                out[i] = self._prompt_end_lp[t][first].numpy()
            else:
                todo.append(i)
        side = tok.padding_side
        tok.padding_side = "left"  # the last position of every row is then the prompt's end
        try:
            for start in range(0, len(todo), self.batch_size):
                rows = todo[start: start + self.batch_size]
                enc = tok([texts[i] for i in rows], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(dev)
                with torch.no_grad():
                    try:  # only the last position's logits: the unembedding of every position is waste
                        logits = hf(**enc, logits_to_keep=1).logits[:, -1].float()
                    except TypeError:  # models without logits_to_keep
                        logits = hf(**enc).logits[:, -1].float()
                lp = torch.log_softmax(logits, -1)[:, first]
                out[rows] = lp.cpu().numpy()
        finally:
            tok.padding_side = side
        return out

    def _remember_prompt_ends(self, texts: Sequence[str], first_logits) -> None:
        import torch

        lps = torch.log_softmax(first_logits.float(), -1).cpu()
        for t, lp in zip(texts, lps, strict=True):
            self._prompt_end_lp[t] = lp.clone()
            self._prompt_end_lp.move_to_end(t)
        while len(self._prompt_end_lp) > self._prompt_end_lp_max:
            self._prompt_end_lp.popitem(last=False)

    def __repr__(self) -> str:
        return f"LocalChatLLM(name={self.name!r}, batch_size={self.batch_size})"


class _VocabClasses:
    """Each token of a vocabulary decoded once, and classed for :class:`_WordGrammar`: ``start`` (letters,
    with or without a leading space: may begin a reply), ``cont`` (letters, ``'`` or ``-`` with no leading
    space: continues the current word), ``new`` (a space, then letters: begins another word)."""

    _START = re.compile(r"^ ?[A-Za-z][A-Za-z'-]*$")
    _CONT = re.compile(r"^[A-Za-z'-]+$")
    _NEW = re.compile(r"^ [A-Za-z][A-Za-z'-]*$")

    def __init__(self, tokenizer) -> None:
        import torch

        n = len(tokenizer)
        self.text = tokenizer.batch_decode([[i] for i in range(n)])
        special = set(getattr(tokenizer, "all_special_ids", []) or [])

        def mask(rx: re.Pattern) -> torch.Tensor:
            return torch.tensor([i not in special and bool(rx.match(t)) for i, t in enumerate(self.text)])

        self.start, self.cont, self.new = mask(self._START), mask(self._CONT), mask(self._NEW)
        # A word-level vocabulary (decode puts a space between any two tokens): every token is a word.
        plain = [i for i in torch.nonzero(self.cont).flatten().tolist()[:50] if self.text[i].isalpha()][:2]
        if len(plain) == 2 and tokenizer.decode(plain) != self.text[plain[0]] + self.text[plain[1]]:
            self.new = self.start.clone()
            self.cont = torch.zeros_like(self.cont)
        self.by_lower: dict[str, list[int]] = {}
        for i, t in enumerate(self.text):
            if i not in special:
                self.by_lower.setdefault(t.lower(), []).append(i)


class _WordGrammar:
    """A logits processor: each row's reply is 1 to ``max_words`` words, then the end.

    The first token must begin a word; after it, a token that continues the word or (below ``max_words``)
    begins another is allowed, and wherever the model's own first choice is anything else (punctuation, a
    new line, the end, a word past ``max_words``) the reply ends there: it is forced to ``eos``. A token
    that would make the reply spell the row's banned word (or its first ``_BAN_PREFIX`` letters) is masked, and the reply
    cannot end while it equals that word.
    """

    _BAN_PREFIX = 4

    def __init__(self, vocab: _VocabClasses, tokenizer, max_words: int, bans: list[str | None], eos: int) -> None:
        self.vocab, self.tok, self.max_words, self.eos = vocab, tokenizer, int(max_words), int(eos)
        self.bans = [b.strip().lower() if b and b.strip() else None for b in bans]
        self.width = 0  # the prompt's width in the batch; set per generate call

    def _spells_ban(self, so_far: str, ban: str) -> list[int]:
        """Tokens that, appended to ``so_far``, make the reply a beginning of ``ban`` of at least
        ``_BAN_PREFIX`` letters (or all of it): "w" may still begin "worst" when "wonderful" is banned,
        "wond" may not."""
        head = so_far.lstrip().lower()
        if not ban.startswith(head):
            return []
        rest, out = ban[len(head):], []
        for k in range(max(1, min(len(ban), self._BAN_PREFIX) - len(head)), len(rest) + 1):
            out += self.vocab.by_lower.get(rest[:k], [])
            if not head:  # the reply's first token may carry a leading space
                out += self.vocab.by_lower.get(" " + rest[:k], [])
        return out

    def __call__(self, input_ids, scores):
        import torch

        v = self.vocab
        n_vocab = min(scores.shape[1], len(v.text))
        neg = torch.finfo(scores.dtype).min
        # Out of place: generate keeps the raw logits (output_logits) as this very tensor.
        keep = torch.ones(scores.shape, dtype=torch.bool)
        for r in range(scores.shape[0]):
            gen = input_ids[r, self.width:].tolist()
            if self.eos in gen:  # finished: generate pads this row whatever it is given
                continue
            text = self.tok.decode(gen) if gen else ""
            allow = torch.zeros(scores.shape[1], dtype=torch.bool)
            if not gen:
                allow[:n_vocab] = v.start[:n_vocab]
            else:
                n_words = len(text.split())
                best = int(scores[r].argmax())
                goes_on = best < n_vocab and (bool(v.cont[best]) or (bool(v.new[best]) and n_words < self.max_words))
                if goes_on:
                    allow[:n_vocab] = v.cont[:n_vocab] | (v.new[:n_vocab] if n_words < self.max_words else False)
                allow[self.eos] = True
            ban = self.bans[r]
            if ban is not None:
                spells = [i for i in self._spells_ban(text, ban) if i < n_vocab]
                allow[spells] = False
                if text.strip().lower() == ban:  # not done while it is the banned word
                    allow[self.eos] = False
                    if gen and not allow.any():
                        allow[:n_vocab] = v.cont[:n_vocab] | v.new[:n_vocab]
            if not allow.any():
                allow[self.eos] = True
            keep[r] = allow
        return scores.masked_fill(~keep.to(scores.device), neg)
