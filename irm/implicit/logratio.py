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

import numpy as np
import torch
from jaxtyping import Float

from irm.log import get_logger
from irm.rewards.base import BaseRewardModel

log = get_logger(__name__)

__all__ = ["response_logprobs", "token_log_ratios", "LogRatioRM"]


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

    ``share_prefix`` (default): texts that begin with the same tokens as an earlier "anchor" text (the
    perturbations of one response, the responses to one prompt) run only their remaining tokens, on
    the anchor's key/value cache. Equal to separate passes to float precision; the first shared batch
    is checked against a full pass, and a model that does not reproduce it is scored without sharing.
    """
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
    plan = _share_plan(ids_of) if share_prefix and len(texts) > 1 else []
    shared = {j for _, members in plan for j, _ in members}
    if plan:
        from irm.models import float32_compute

        with float32_compute(model.hf_model):  # exact for a model in mixed precision; redone below in it
            ok = scorer.check_shared(plan[0])
        if not ok:
            plan, shared = [], set()
    rest = [i for i in range(len(texts)) if i not in shared]
    for b0 in range(0, len(rest), batch_size):  # texts that share no prefix: left-padded full passes
        scorer.full(sorted(rest, key=lambda i: len(ids_of[i]))[b0 : b0 + batch_size])
    # Anchors in groups of batch_size, each followed by the members that reuse their cache.
    for g0 in range(0, len(plan), batch_size):
        group = plan[g0 : g0 + batch_size]
        cache, hidden, lp_at = scorer.anchors([a for a, _ in group])
        members = [(j, k, c) for k, (_, ms) in enumerate(group) for j, c in ms]
        members.sort(key=lambda m: len(ids_of[m[0]]) - m[2])  # by tokens left to run: little padding
        for b0 in range(0, len(members), batch_size):
            scorer.members(members[b0 : b0 + batch_size], cache, hidden, lp_at)
    return scorer.out


# A text reuses an anchor's cache when they share at least this many leading tokens.
_MIN_SHARED = 8
_MAX_CANDIDATES = 64  # anchor candidates tried per cluster and round (bounds the quadratic search)


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def _share_plan(ids_of: list[list[int]]) -> list[tuple[int, list[tuple[int, int]]]]:
    """``[(anchor, [(member, shared_len), ...])]``, the texts that run on an anchor's cache.

    Sorted by token ids, texts fall into clusters whose neighbours share ``_MIN_SHARED`` tokens. In a
    cluster the anchor is the text that shares the most tokens with the others (for perturbations of
    one response: the unperturbed response); texts sharing ``_MIN_SHARED`` tokens with it join it,
    and the rest of the cluster is searched again. Texts left out run as plain passes.
    """
    order = sorted(range(len(ids_of)), key=lambda i: ids_of[i])
    clusters: list[list[int]] = []
    for i in order:
        if clusters and _lcp(ids_of[clusters[-1][-1]], ids_of[i]) >= _MIN_SHARED:
            clusters[-1].append(i)
        else:
            clusters.append([i])

    def shared(a: int, b: int) -> int:  # at least one token of b's own is left to run
        return min(_lcp(ids_of[a], ids_of[b]), len(ids_of[b]) - 1)

    plan = []
    for remaining in clusters:
        while len(remaining) >= 2:
            step = max(1, len(remaining) // _MAX_CANDIDATES)
            best, best_saving = remaining[0], -1
            for a in remaining[::step]:
                saving = sum(n for b in remaining if b != a and (n := shared(a, b)) >= _MIN_SHARED)
                if saving > best_saving:
                    best, best_saving = a, saving
            members = [(b, n) for b in remaining if b != best and (n := shared(best, b)) >= _MIN_SHARED]
            if not members:
                break
            plan.append((best, members))
            taken = {best, *(b for b, _ in members)}
            remaining = [b for b in remaining if b not in taken]
    return plan


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
            logits = self.hf.get_output_embeddings()(torch.cat(hs)).float()
            lp = (logits.gather(-1, torch.tensor(tg, device=logits.device)[:, None])[:, 0]
                  - torch.logsumexp(logits, -1)).cpu().numpy().astype(np.float64)
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

    def anchors(self, batch: list[int]):
        """Right-padded full passes of the anchors (a row's positions are then 0..n-1, as its members
        expect); returns their key/value cache and final hidden states."""
        from transformers import DynamicCache

        ids, mask = self._padded([self.ids_of[i] for i in batch], left=False)
        cache = DynamicCache(config=self.hf.config)
        h = self.hf.base_model(input_ids=ids.to(self.dev), attention_mask=mask.to(self.dev), past_key_values=cache,
                               use_cache=True).last_hidden_state
        self._score([(i, h[r, : len(self.ids_of[i])]) for r, i in enumerate(batch)])
        # Per anchor row: log-probabilities by position, which members copy inside their shared prefix.
        lp_at = [dict(zip(self.targets_of[i].tolist(), self.out[i].tolist(), strict=True)) for i in batch]
        return cache, h, lp_at

    def members(self, batch: list[tuple[int, int, int]], cache, hidden, lp_at: list[dict[int, float]]) -> None:
        """Texts ``(i, anchor row k, shared length c)``: row r attends to its anchor's first c positions
        (the cache, cut at the batch's largest c, with the rest masked) and runs only its own tokens."""
        from transformers import DynamicCache

        big_c = max(c for _, _, c in batch)
        rows = torch.tensor([k for _, k, _ in batch], device=hidden.device)
        sub = DynamicCache(config=self.hf.config)
        for layer, (k_, v_) in enumerate(_cache_layers(cache)):
            sub.update(k_[rows, :, :big_c], v_[rows, :, :big_c], layer)
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
        # A token inside the shared prefix (position < c) has the anchor's log-probability: same context,
        # same token. Only the rest is unembedded.
        known = [{p: v for p, v in lp_at[k].items() if p < c} for _, k, c in batch]
        self._score([(i, torch.cat([hidden[k, :c], h[r, : len(self.ids_of[i]) - c]]))
                     for r, (i, k, c) in enumerate(batch)], known)

    def check_shared(self, entry: tuple[int, list[tuple[int, int]]]) -> bool:
        """A few members through their anchor's cache, in one batch (so rows with different shared
        lengths, hence masked cache positions and shifted ``position_ids``), against their own full
        passes: False (with a warning) if this model does not reproduce them, e.g. one whose forward
        ignores ``position_ids`` or the cache."""
        a, ms = entry
        ms = sorted(ms, key=lambda m: m[1])
        probe = list({c: (i, c) for i, c in ms}.values())[:4]  # distinct shared lengths first
        # The anchor itself, sharing all but its last token: the widest cache, so other rows have holes.
        probe.append((a, len(self.ids_of[a]) - 1))
        try:
            cache, hidden, lp_at = self.anchors([a])
            self.members([(i, 0, c) for i, c in probe], cache, hidden, lp_at)
        except Exception as e:  # noqa: BLE001 - any failure means: score without sharing
            log.warning("%s: scoring through a shared prefix fails (%s: %s); using full passes.",
                        self.model.identity.spec, type(e).__name__, e)
            return False
        got = {i: self.out[i] for i, _ in probe}
        self.full([i for i, _ in probe])
        from irm.models import shared_pass_check

        ok, err = shared_pass_check(np.concatenate([got[i] for i, _ in probe]),
                                    np.concatenate([self.out[i] for i, _ in probe]), self.hf)
        if not ok:
            log.warning("%s: log-probabilities through a shared prefix differ from a full pass by %.2g; "
                        "using full passes.", self.model.identity.spec, err)
            return False
        return True


def _cache_layers(cache):
    """(keys, values) per layer of a transformers cache ([batch, heads, positions, head_dim] each)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def token_log_ratios(
    pair, prompts: Sequence[str], responses: Sequence[str], *, beta: float = 1.0, **kw
) -> list[np.ndarray]:
    """``beta * (log p_tuned - log p_base)`` of every response token: one array per response."""
    from irm.threads import run_side_by_side

    # The two models at the same time on a CPU (irm.threads); one after the other elsewhere.
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
        ratios = token_log_ratios(self.pair, prompts, responses, beta=self.beta, batch_size=self.batch_size)
        agg = np.mean if self.length_normalise else np.sum
        return np.array([float(agg(r)) if len(r) else 0.0 for r in ratios])

