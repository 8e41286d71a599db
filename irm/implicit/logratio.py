"""The log-ratio implicit reward: ``beta * (log p_tuned(t | ctx) - log p_base(t | ctx))``.

For a policy tuned with a KL penalty of strength ``beta`` towards the base, this per-token quantity
is an implicit reward (the "your language model is secretly a reward model" identity). It needs no
probe, has the same token-level type signature as a utility table, and is the baseline the linear
IRM has to beat.

>>> rm = LogRatioRM(pair, beta=0.04)
>>> rm.score(["The movie was"], [" wonderful"])       # beta * sum of the response tokens' log-ratios
>>> token_log_ratios(pair, ["The movie was"], [" wonderful"])[0]   # per response token
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float

from irm.core.log import get_logger
from irm.models.sharing import CALL_COST_TOKENS as _CALL_COST_TOKENS  # noqa: F401 - tests read them here
from irm.models.sharing import MIN_SHARED as _MIN_SHARED  # noqa: F401
from irm.models.sharing import ShareTree as _ShareTree
from irm.models.sharing import batches as _batches
from irm.models.sharing import cache_layers as _cache_layers
from irm.models.sharing import padded_cache
from irm.rewards.base import BaseRewardModel, register_reward_model

log = get_logger(__name__)

__all__ = ["response_logprobs", "response_logprob_sums", "token_log_ratios", "LogRatioRM", "BaseLogprobRM"]


@torch.no_grad()
def response_logprobs(
    model,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 256,
    share_prefix: bool = True,
) -> list[Float[np.ndarray, " n_response_tokens"]]:
    """``log p(t | ctx)`` of every response token, for each (prompt, response).

    ``model`` is an :class:`irm.models.LoadedModel`. A token belongs to the response if it covers any
    character of the response (the prompt's tokenisation is not assumed to be a prefix).

    ``share_prefix`` (default): a text that begins with the same tokens as another one (the
    perturbations of one response, the responses to one prompt) runs only its remaining tokens, on
    the other's key/value cache (:class:`_ShareTree`), so every shared beginning is computed once.
    Equal to separate passes to float precision; a small subtree is first checked against full
    passes, and a model that does not reproduce them is scored without sharing.
    """
    from irm.models import unwrapped

    with unwrapped(model.hf_model):  # no TransformerBridge wrappers: scoring needs no hook
        return _response_logprobs(model, prompts, responses, batch_size=batch_size, max_length=max_length,
                                  share_prefix=share_prefix)


def response_logprob_sums(model, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int = 32,
                          max_length: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``(sums, counts)``: per (prompt, response), the sum of its response tokens' log-probabilities
    (:func:`response_logprobs`) and how many tokens there are.

    Inside :func:`irm.models.memo.sharing_logprobs` texts another scorer already ran through ``model``
    (the fluency check, the probe IRM's capture) are read from the memo, and what this call computes
    is added to it (texts cut at ``max_length`` are neither read nor stored).
    """
    from irm.models.memo import LogprobEntry, logprob_memo

    prompts, responses = list(prompts), list(responses)
    sums, counts = np.zeros(len(prompts)), np.zeros(len(prompts), dtype=np.int64)
    memo = logprob_memo(model)
    n_tok: list[int] = []
    if memo is not None:
        enc = model.tokenizer([p + r for p, r in zip(prompts, responses, strict=True)], add_special_tokens=True,
                              truncation=False)
        n_tok = [len(x) for x in enc["input_ids"]]
    todo = []
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        e = memo.get((p, r)) if memo is not None else None
        if e is not None and e.n_tokens <= max_length:
            sums[i], counts[i] = e.total, e.n
        else:
            todo.append(i)
    if todo:
        lps = response_logprobs(model, [prompts[i] for i in todo], [responses[i] for i in todo],
                                batch_size=batch_size, max_length=max_length)
        for i, lp in zip(todo, lps, strict=True):
            sums[i], counts[i] = float(np.sum(lp)), len(lp)
            if memo is not None and n_tok[i] <= max_length:
                memo[prompts[i], responses[i]] = LogprobEntry(float(sums[i]), int(counts[i]), n_tok[i])
    return sums, counts


def _response_logprobs(model, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int,
                       max_length: int, share_prefix: bool) -> list[np.ndarray]:
    tok = model.tokenizer
    texts = [p + r for p, r in zip(prompts, responses, strict=True)]
    enc = tok(texts, add_special_tokens=True, truncation=True, max_length=max_length, return_offsets_mapping=True)
    ids_of = [list(x) for x in enc["input_ids"]]
    targets_of = []  # per text: positions of the response tokens it scores (each predicted from the one before)
    for i, offs in enumerate(enc["offset_mapping"]):
        offs = np.asarray(offs).reshape(-1, 2)
        in_resp = offs[:, 1] > len(prompts[i])
        in_resp[0] = False  # the first token has no context to be predicted from
        targets_of.append(np.nonzero(in_resp)[0])
    scorer = _Scorer(model, ids_of, targets_of)
    tree = _ShareTree(ids_of) if share_prefix and len(texts) > 1 else None
    if tree is not None and tree.n_shared and not _shared_prefix_ok(model, scorer, tree):
        tree = None
    if tree is None or not tree.n_shared:
        for batch in _batches(list(range(len(texts))), [len(x) for x in ids_of], batch_size, model.device):
            scorer.full(batch)  # left-padded full passes
        return scorer.out
    for chunk in tree.chunks(_CHUNK_TEXTS):
        scorer.run_tree(tree, chunk, batch_size)
    return scorer.out


def _shared_prefix_ok(model, scorer: _Scorer, tree: _ShareTree) -> bool:
    """:meth:`_Scorer.check_shared`, once per model (its body's forward code, weights, compute dtype and
    device): whether a model handles a key/value cache, positions and masks correctly does not depend on
    the texts."""
    from irm.models import compute_dtype, float32_compute

    hf = model.hf_model
    key = (type(hf.base_model).forward, sum(int(p._version) for p in hf.parameters()), str(compute_dtype(hf)),
           str(model.device))
    checked = hf.__dict__.setdefault("_irm_shared_prefix_ok", {})
    if key not in checked:
        with float32_compute(hf):  # exact for a model in mixed precision
            checked[key] = scorer.check_shared(tree)
    return checked[key]


# Texts whose caches may be held at once: the tree is run in chunks of whole subtrees of about this size.
_CHUNK_TEXTS = 1024




class _State:
    """What a text's children need of it: key/value cache and final hidden states at every position, and
    its log-probabilities by position."""

    __slots__ = ("kv", "hidden", "lp_at")

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]], hidden: torch.Tensor, lp_at: dict[int, float]):
        self.kv, self.hidden, self.lp_at = kv, hidden, lp_at


class _Scorer:
    """Final hidden states -> response log-probabilities, for full passes, anchors and their members."""

    def __init__(self, model, ids_of: list[list[int]], targets_of: list[np.ndarray]) -> None:
        self.model, self.hf = model, model.hf_model
        cfg = self.hf.config
        if getattr(cfg, "final_logit_softcapping", None) or self.hf.get_output_embeddings() is None:
            raise NotImplementedError(
                f"{cfg.model_type} post-processes its logits; response_logprobs supports plain unembeddings.")
        self.ids_of, self.targets_of = ids_of, targets_of
        self.pad = model.tokenizer.pad_token_id
        self.dev = model.device
        self.out: list[np.ndarray] = [np.zeros(0)] * len(ids_of)

    def _score(self, rows: list[tuple[int, torch.Tensor]], known: list[dict[int, float]] | None = None) -> None:
        """``rows``: (text, its final hidden states [n_tokens, d]); only response positions are unembedded,
        except those whose log-probability ``known[row]`` already holds (a member's shared prefix)."""
        hs, tg, owners = [], [], []
        for r, (i, h) in enumerate(rows):
            pos = self.targets_of[i]
            if known is not None:
                pos = np.array([p for p in pos if p not in known[r]], dtype=np.int64)
            hs.append(h[torch.as_tensor(pos - 1, dtype=torch.long, device=h.device)])
            tg += [self.ids_of[i][p] for p in pos]
            owners.append((i, pos))
        lp = np.zeros(0)
        if tg:
            from irm.models import token_logprobs

            logits = self.hf.get_output_embeddings()(torch.cat(hs)).float()
            lp = token_logprobs(logits, torch.tensor(tg)).cpu().numpy().astype(np.float64)
        k = 0
        for r, (i, pos) in enumerate(owners):
            new = dict(zip(pos.tolist(), lp[k : k + len(pos)].tolist(), strict=True))
            k += len(pos)
            if known is not None:
                new.update(known[r])
            self.out[i] = np.array([new[p] for p in self.targets_of[i]], dtype=np.float64)

    def _padded(self, seqs: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            sl = slice(width - len(s), width) if left else slice(0, len(s))
            ids[r, sl], mask[r, sl] = torch.tensor(s), 1
        return ids, mask

    def full(self, batch: list[int]) -> None:
        ids, mask = self._padded([self.ids_of[i] for i in batch], left=True)
        h = self.hf.base_model(input_ids=ids.to(self.dev), attention_mask=mask.to(self.dev)).last_hidden_state
        w = ids.shape[1]
        self._score([(i, h[r, w - len(self.ids_of[i]):]) for r, i in enumerate(batch)])

    def run_tree(self, tree: _ShareTree, texts: list[int], batch_size: int) -> None:
        """Score ``texts`` (whole subtrees of ``tree``) level by level; a level's states are dropped once
        the next level has run."""
        texts_set = set(texts)
        lengths = [len(x) for x in self.ids_of]
        roots = [i for i in texts if tree.parent[i] < 0]
        lone = [i for i in roots if not tree.children[i]]
        for batch in _batches(lone, lengths, batch_size, self.dev):  # no children: plain left-padded passes
            self.full(batch)
        level = [i for i in roots if tree.children[i]]
        states: dict[int, _State] = {}
        for batch in _batches(level, lengths, batch_size, self.dev):
            states.update(self.anchors(batch, keep=set(level)))
        while level:
            level = [c for i in level for c in tree.children[i] if c in texts_set]
            keep = {i for i in level if tree.children[i]}
            left = {i: lengths[i] - tree.shared[i] for i in level}  # tokens each runs itself
            nxt: dict[int, _State] = {}
            for batch in _batches(level, left, batch_size, self.dev):
                nxt.update(self.members([(i, states[tree.parent[i]], tree.shared[i]) for i in batch], keep=keep))
            states = nxt

    def anchors(self, batch: list[int], keep: set[int]) -> dict[int, _State]:
        """Right-padded full passes (a row's positions are then 0..n-1, as its children expect); returns
        the states of the texts in ``keep``."""
        from transformers import DynamicCache

        ids, mask = self._padded([self.ids_of[i] for i in batch], left=False)
        cache = DynamicCache(config=self.hf.config)
        h = self.hf.base_model(input_ids=ids.to(self.dev), attention_mask=mask.to(self.dev), past_key_values=cache,
                               use_cache=True).last_hidden_state
        self._score([(i, h[r, : len(self.ids_of[i])]) for r, i in enumerate(batch)])
        layers = _cache_layers(cache)
        out = {}
        for r, i in enumerate(batch):
            if i in keep:
                n = len(self.ids_of[i])
                out[i] = _State([(k_[r, :, :n].clone(), v_[r, :, :n].clone()) for k_, v_ in layers],
                                h[r, :n].clone(), self._lp_at(i))
        return out

    def _lp_at(self, i: int) -> dict[int, float]:
        return dict(zip(self.targets_of[i].tolist(), self.out[i].tolist(), strict=True))

    def members(self, batch: list[tuple[int, _State, int]], keep: set[int]) -> dict[int, _State]:
        """Texts ``(i, parent state, shared length c)``: row r attends to its parent's first c positions
        (a cache padded to the batch's largest c, the rest masked) and runs only its own tokens. Returns
        the states of the texts in ``keep``."""

        sub, big_c = padded_cache(self.hf.config, [st.kv for _, st, _ in batch], [c for _, _, c in batch])
        tails = [self.ids_of[i][c:] for i, _, c in batch]
        ids, tail_mask = self._padded(tails, left=False)
        mask = torch.zeros((len(batch), big_c + ids.shape[1]), dtype=torch.long)
        mask[:, big_c:] = tail_mask
        pos = torch.zeros_like(ids)
        for r, (_, _, c) in enumerate(batch):
            mask[r, :c] = 1
            pos[r] = c + torch.arange(ids.shape[1])
        h = self.hf.base_model(input_ids=ids.to(self.dev), attention_mask=mask.to(self.dev),
                               position_ids=pos.to(self.dev), past_key_values=sub, use_cache=True).last_hidden_state
        # A token inside the shared prefix (position < c) has the parent's log-probability: same context,
        # same token. Only the rest is unembedded.
        hidden = [torch.cat([st.hidden[:c], h[r, : len(self.ids_of[i]) - c]]) for r, (i, st, c) in enumerate(batch)]
        known = [{p: v for p, v in st.lp_at.items() if p < c} for _, st, c in batch]
        self._score([(i, hidden[r]) for r, (i, _, _) in enumerate(batch)], known)
        out = {}
        if keep.intersection(i for i, _, _ in batch):
            layers = _cache_layers(sub)
            for r, (i, _, c) in enumerate(batch):
                if i in keep:
                    n_own = len(self.ids_of[i]) - c
                    out[i] = _State([(torch.cat([k_[r, :, :c], k_[r, :, big_c : big_c + n_own]], 1),
                                      torch.cat([v_[r, :, :c], v_[r, :, big_c : big_c + n_own]], 1))
                                     for k_, v_ in layers], hidden[r], self._lp_at(i))
        return out

    def check_shared(self, tree: _ShareTree) -> bool:
        """A small subtree (a root, children with different shared lengths, a grandchild, and the root
        again sharing all but its last token, so other rows have masked cache positions) through the
        tree's path, against full passes: False (with a warning) if this model does not reproduce them,
        e.g. one whose forward ignores ``position_ids`` or the cache."""
        root = next(i for i in tree.order if tree.parent[i] < 0 and tree.children[i])
        kids = list({tree.shared[c]: c for c in tree.children[root]}.values())[:3]
        grand = [g for c in tree.children[root] for g in tree.children[c]][:1]
        picked = [root, *kids, *[tree.parent[g] for g in grand if tree.parent[g] not in kids], *grand]
        ids = [self.ids_of[i] for i in picked] + [self.ids_of[root]]
        targets = [self.targets_of[i] for i in picked] + [self.targets_of[root]]
        sub = _ShareTree.__new__(_ShareTree)
        n = len(ids)
        sub.order, sub.parent, sub.shared = list(range(n)), [-1] * n, [0] * n
        sub.depth, sub.children = [0] * n, [[] for _ in range(n)]
        for k, i in enumerate(picked[1:], start=1):
            p = picked.index(tree.parent[i])
            sub.parent[k], sub.shared[k] = p, tree.shared[i]
            sub.children[p].append(k)
        sub.parent[n - 1], sub.shared[n - 1] = 0, len(ids[0]) - 1
        sub.children[0].append(n - 1)
        sub.n_shared = n - 1
        via_tree = _Scorer(self.model, ids, targets)
        try:
            via_tree.run_tree(sub, list(range(n)), batch_size=n)
        except Exception as e:  # noqa: BLE001 - any failure means: score without sharing
            log.warning("%s: scoring through a shared prefix fails (%s: %s); using full passes.",
                        self.model.identity.spec, type(e).__name__, e)
            return False
        plain = _Scorer(self.model, ids, targets)
        plain.full(list(range(n)))
        from irm.models import shared_pass_check

        ok, err = shared_pass_check(np.concatenate(via_tree.out), np.concatenate(plain.out), self.hf)
        if not ok:
            log.warning("%s: log-probabilities through a shared prefix differ from a full pass by %.2g; "
                        "using full passes.", self.model.identity.spec, err)
            return False
        return True


def token_log_ratios(
    pair, prompts: Sequence[str], responses: Sequence[str], *, beta: float = 1.0, **kw
) -> list[np.ndarray]:
    """``beta * (log p_tuned - log p_base)`` of every response token: one array per response."""
    from irm.core.threads import run_side_by_side

    # The two models at the same time on a CPU (irm.core.threads); one after the other elsewhere.
    lt, lb = run_side_by_side([lambda: response_logprobs(pair.tuned, prompts, responses, **kw),
                               lambda: response_logprobs(pair.base, prompts, responses, **kw)],
                              [pair.tuned, pair.base])
    return [beta * (a - b) for a, b in zip(lt, lb, strict=True)]


class LogRatioRM(BaseRewardModel):
    """Sequence reward = ``beta`` x the sum over response tokens of the tuned/base log-ratio.

    ``length_normalise=True`` averages instead of summing (long responses then do not dominate).
    """

    def __init__(self, pair, *, beta: float = 0.04, length_normalise: bool = False, batch_size: int = 32,
                 name: str = "irm_logratio") -> None:
        if beta <= 0:
            raise ValueError(f"beta must be > 0 (the KL coefficient of the tuning), got {beta}.")
        self.pair = pair
        self.beta = float(beta)
        self.length_normalise = length_normalise
        self.batch_size = batch_size
        self.name = name

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        self._check_batch(prompts, responses)
        from irm.core.threads import run_side_by_side

        # Sums only (the per-token ratios are token_log_ratios): read from the pair's shared memo where
        # another scorer of these texts already ran the models (irm.models.memo.sharing_logprobs).
        pair, kw = self.pair, {"batch_size": self.batch_size}
        (st, n), (sb, _) = run_side_by_side([lambda: response_logprob_sums(pair.tuned, prompts, responses, **kw),
                                             lambda: response_logprob_sums(pair.base, prompts, responses, **kw)],
                                            [pair.tuned, pair.base])
        total = self.beta * (st - sb)
        if self.length_normalise:
            return np.where(n > 0, total / np.maximum(n, 1), 0.0)
        return np.where(n > 0, total, 0.0)



class BaseLogprobRM(BaseRewardModel):
    """A control, never an IRM: the untuned base model's own preference, ``log p_base(response | prompt)``
    summed over the response tokens. What an IRM's agreement with the explicit RM is measured against: a
    pair of texts the base already orders as the RM does needs no tuning to be ordered so."""

    def __init__(self, model, *, batch_size: int = 32, name: str = "control_logprob") -> None:
        self.model = model
        self.batch_size = batch_size
        self.name = name

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        self._check_batch(prompts, responses)
        sums, _ = response_logprob_sums(self.model, prompts, responses, batch_size=self.batch_size)
        return sums


def _model_ref(ident: dict[str, Any]) -> str:
    ckpt = ident.get("checkpoint")
    return ckpt if ckpt and Path(ckpt).exists() else ident["spec"]


@register_reward_model("logratio")
def _build_logratio(path: str, beta: float | None = None, length_normalise: bool = False, batch_size: int = 32,
                    device: str = "cpu", name: str = "irm_logratio") -> LogRatioRM:
    """``kind = "logratio"``: ``path`` is a run directory (its pair, and its tune's beta) or
    ``"BASE,TUNED"`` (two model specs)."""
    import json

    from irm.models import ModelPair, load_model

    p = Path(path)
    if (p / "results.json").is_file():
        res = json.loads((p / "results.json").read_text())
        pair_ids = res.get("pair") or {}
        if not (pair_ids.get("base") and pair_ids.get("tuned")):
            raise ValueError(f"{p}/results.json names no tuned model (its pair section is {pair_ids!r}); the "
                             "log-ratio IRM needs a base and a tuned model.")
        base, tuned = _model_ref(pair_ids["base"]), _model_ref(pair_ids["tuned"])
        if beta is None:
            beta = ((res.get("config") or {}).get("tune") or {}).get("beta")
    elif "," in path:
        base, tuned = (s.strip() for s in path.split(",", 1))
    else:
        raise ValueError(f"logratio RM: {path!r} is neither a run directory (with results.json) nor 'BASE,TUNED'.")
    pair = ModelPair(load_model(base, device=device), load_model(tuned, device=device))
    return LogRatioRM(pair, beta=float(beta or 0.04), length_normalise=length_normalise, batch_size=batch_size,
                      name=name)
