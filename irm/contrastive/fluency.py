"""Fluency of perturbations, measured with a language model: perplexity ratio to the original.

A perturbation is only evidence about an RM if a reader would accept the perturbed text as a response:
an edit that makes it read like noise explains nothing (a flip could be the RM reacting to garbage).
:class:`LMFluency` scores each response by its perplexity under a causal LM given the prompt, and
:func:`explain` drops perturbations whose perplexity exceeds ``max_perplexity_ratio`` times the
original's (except the fluency attribute's own "less fluent" edits, whose purpose is disfluency), and
counts them in the results.

In the pipeline the LM is the run's base model; standalone (``irm explain --rm ...``) it is the
embedded SmolLM2-135M-Instruct unless ``--fluency-model`` names another (``none`` turns it off).

>>> flu = LMFluency("smollm2-135m-instruct")
>>> flu.perplexity(["The soup was"], [" cold and salty."])
array([...])
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from irm.core.log import get_logger

__all__ = ["LMFluency", "DEFAULT_FLUENCY_MODEL"]

log = get_logger(__name__)

DEFAULT_FLUENCY_MODEL = "smollm2-135m-instruct"


class LMFluency:
    """Per-response perplexity (exp of the mean token NLL of the response given its prompt) under a causal LM.

    ``model``: an :class:`irm.models.LoadedModel` (anything with ``hf_model`` and ``tokenizer``) or a
    model spec string, loaded on first use with :func:`irm.models.load_model`.
    """

    def __init__(self, model: Any = DEFAULT_FLUENCY_MODEL, *, batch_size: int = 32, max_tokens: int = 256,
                 cache: bool | str | Path = True) -> None:
        if isinstance(model, str):
            if not model.strip():
                raise ValueError("LMFluency needs a model spec, e.g. 'smollm2-135m-instruct', or a loaded model.")
            self.spec: str | None = model
            self._model = None
        elif hasattr(model, "hf_model") and hasattr(model, "tokenizer"):
            self.spec = getattr(getattr(model, "identity", None), "spec", None)
            self._model = model
        else:
            raise TypeError(f"model must be a model spec string or a loaded model (hf_model + tokenizer), got "
                            f"{type(model).__name__}")
        if batch_size < 1 or max_tokens < 2:
            raise ValueError(f"batch_size must be >= 1 and max_tokens >= 2, got {batch_size}, {max_tokens}")
        self.batch_size = int(batch_size)
        self.max_tokens = int(max_tokens)
        # Perplexities are kept on disk per model (a spec string names it), so a rerun scores nothing twice.
        if cache is True:
            from irm.models import cache_dir

            self.cache_path: Path | None = cache_dir() / "fluency" if self.spec else None
        else:
            self.cache_path = Path(cache) if cache else None
        self._memo: dict[str, float] | None = None
        self.n_scored = 0
        self.n_cached = 0

    @property
    def name(self) -> str:
        m = self._model
        ident = getattr(m, "identity", None) if m is not None else None
        return str(getattr(ident, "spec", None) or self.spec or type(getattr(m, "hf_model", m)).__name__)

    def _load(self) -> Any:
        if self._model is None:
            from irm.models import load_model

            log.info("fluency: loading %s", self.spec)
            self._model = load_model(self.spec)
        return self._model

    def _cache_file(self) -> Path | None:
        if self.cache_path is None or not self.spec:
            return None
        ident = getattr(self._model, "identity", None) if self._model is not None else None
        # A loaded model is keyed by its identity (checkpoint fingerprint / hub revision), a spec by its name.
        who = json.dumps(ident.to_dict(), sort_keys=True) if hasattr(ident, "to_dict") else self.spec
        tag = hashlib.sha256(f"{who}|{self.max_tokens}".encode()).hexdigest()[:16]
        return self.cache_path / f"ppl-{tag}.jsonl"

    def _key(self, prompt: str, text: str) -> str:
        return hashlib.sha256(json.dumps([prompt, text]).encode()).hexdigest()[:32]

    def perplexity(self, prompts: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        """``float64[n]``: the perplexity of each ``texts[i]`` following ``prompts[i]`` (cached on disk)."""
        if isinstance(texts, str) or isinstance(prompts, str):
            raise TypeError("perplexity takes lists of prompts and texts; wrap a single text in a list")
        if len(prompts) != len(texts):
            raise ValueError(f"prompts ({len(prompts)}) and texts ({len(texts)}) must have one length")
        if self._model is None and self.cache_path is not None:
            self._load()  # its identity names the cache file
        f = self._cache_file()
        if self._memo is None:
            self._memo = {}
            if f is not None and f.is_file():
                for line in f.read_text(encoding="utf-8").splitlines():
                    try:
                        k, v = json.loads(line)
                        self._memo[k] = float(v)
                    except (ValueError, TypeError):
                        continue  # a torn last line of an interrupted run
        keys = [self._key(p, t) for p, t in zip(prompts, texts)]
        todo = sorted({i for i, k in enumerate(keys) if k not in self._memo}, key=keys.__getitem__)
        todo = list({keys[i]: i for i in todo}.values())
        self.n_cached += len(keys) - len(todo)
        if todo:
            got = self._compute([prompts[i] for i in todo], [texts[i] for i in todo])
            self.n_scored += len(todo)
            new = {keys[i]: float(v) for i, v in zip(todo, got)}
            self._memo.update(new)
            if f is not None:
                f.parent.mkdir(parents=True, exist_ok=True)
                with f.open("a", encoding="utf-8") as fh:
                    fh.writelines(json.dumps([k, v]) + "\n" for k, v in new.items())
        return np.array([self._memo[k] for k in keys], dtype=np.float64)

    def _compute(self, prompts: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        from irm.implicit.logratio import response_logprob_sums

        m = self._load()
        # The perturbations of one response share its prompt and most of its text: scored through the
        # log-ratio IRM's shared-prefix path, each shared beginning runs once (checked against full passes).
        # Inside irm.models.memo.sharing_logprobs the sums are left for the log-ratio IRM to reuse.
        out = np.full(len(texts), np.nan)
        idx = [i for i, t in enumerate(texts) if t.strip()]
        if idx:
            sums, counts = response_logprob_sums(m, [prompts[i] for i in idx], [texts[i] for i in idx],
                                                 batch_size=self.batch_size, max_length=self.max_tokens)
            for i, total, n in zip(idx, sums, counts, strict=True):
                if n:
                    out[i] = math.exp(-float(total) / int(n))
        return out

    def _compute_unshared(self, prompts: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        """The same without prefix sharing: plain padded passes (a reference for tests)."""
        from irm.models import unwrapped

        m = self._load()
        with unwrapped(m.hf_model):  # no TransformerBridge wrappers: scoring needs no hook
            return self._compute_plain(m, prompts, texts)

    def _compute_plain(self, m: Any, prompts: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        import torch

        tok, hf = m.tokenizer, m.hf_model
        bos = [tok.bos_token_id] if getattr(tok, "bos_token_id", None) is not None else []
        rows: list[tuple[list[int], int]] = []  # (ids, index of the first response token)
        for p, t in zip(prompts, texts):
            p_ids = bos + tok(p, add_special_tokens=False)["input_ids"] if p else list(bos)
            full = bos + tok(p + t, add_special_tokens=False)["input_ids"]
            start = max(1, min(len(p_ids), len(full) - 1))
            if len(full) > self.max_tokens:  # keep the response, cut the prompt from the left
                drop = len(full) - self.max_tokens
                full, start = full[drop:], max(1, start - drop)
            rows.append((full, start))
        out = np.full(len(rows), np.nan)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        device = next(hf.parameters()).device
        with torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                idx = order[s : s + self.batch_size]
                width = max(len(rows[i][0]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for k, i in enumerate(idx):
                    seq = rows[i][0]
                    ids[k, : len(seq)] = torch.tensor(seq)
                    mask[k, : len(seq)] = 1
                ids_d, mask_d = ids.to(device), mask.to(device)
                # Positions that predict a response token; the LM head runs on those only (a fifth of a
                # small model's compute is its vocabulary projection).
                sel = torch.zeros((len(idx), width), dtype=torch.bool)
                for k, i in enumerate(idx):
                    seq, start = rows[i]
                    sel[k, start - 1 : len(seq) - 1] = True
                head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
                body = getattr(hf, "base_model", None)
                if head is not None and body is not None and body is not hf:
                    h = body(input_ids=ids_d, attention_mask=mask_d).last_hidden_state
                    logits = head(h[sel.to(device)]).float()
                else:
                    logits = hf(input_ids=ids_d, attention_mask=mask_d).logits[sel.to(device)].float()
                targets = torch.zeros_like(ids)
                targets[:, :-1] = ids[:, 1:]
                logp = torch.log_softmax(logits, -1).gather(-1, targets[sel][:, None].to(device))[:, 0].cpu()
                pos = 0
                for k, i in enumerate(idx):
                    n = int(sel[k].sum())
                    nll = -logp[pos : pos + n]
                    pos += n
                    out[i] = math.exp(float(nll.mean())) if n else 1.0
        return out
