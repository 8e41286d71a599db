"""Sharing the work of texts that begin alike: a prefix tree over token ids (:class:`ShareTree`), batches
cut by length at the least cost (:func:`batches`), and the key/value caches they run on
(:func:`cache_layers`, :func:`padded_cache`). Used by the log-ratio IRM's scoring
(:mod:`irm.implicit.logratio`) and by the activation capture (:mod:`irm.activations.capture`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["ShareTree", "batches", "cache_layers", "padded_cache", "repeated_cache", "lcp", "MIN_SHARED", "CALL_COST_TOKENS"]

# A text runs on an earlier text's cache when they share at least this many leading tokens.
MIN_SHARED = 4
# What a forward call costs beyond its tokens, in token passes (see batches).
CALL_COST_TOKENS = 16


def lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


class ShareTree:
    """Which text runs on which earlier text's key/value cache: a prefix tree over the token ids.

    In sorted order a text shares the most leading tokens with any earlier text exactly with its
    predecessor (``L`` tokens). Its *parent* is the first text of the run of neighbours that all share
    those ``L`` tokens; it runs only its tokens after them, on the parent's cache. Every token that
    two texts share at the start is then computed once (with at least one token of each text left to
    run, and ``L >= MIN_SHARED``). A parent is always earlier in sorted order and shares fewer tokens
    with its own parent, so the texts run level by level: roots (full passes), their children, ...
    A subtree is a contiguous run of the sorted order that starts at its root.
    """

    def __init__(self, ids_of: list[list[int]], min_shared: int = MIN_SHARED) -> None:
        n = len(ids_of)
        self.order = sorted(range(n), key=lambda i: ids_of[i])
        self.parent = [-1] * n
        self.shared = [0] * n
        self.depth = [0] * n
        self.children: list[list[int]] = [[] for _ in range(n)]
        # lcp_prev[k]: tokens that order[k] shares with order[k - 1]
        lcp_prev = [0] + [lcp(ids_of[self.order[k - 1]], ids_of[self.order[k]]) for k in range(1, n)]
        for k in range(1, n):
            i = self.order[k]
            shared = min(lcp_prev[k], len(ids_of[i]) - 1)
            if shared < max(1, min_shared):
                continue
            t = k - 1  # walk back to the first text of the run sharing `shared` tokens
            while t > 0 and lcp_prev[t] >= shared:
                t -= 1
            p = self.order[t]
            self.parent[i], self.shared[i], self.depth[i] = p, shared, self.depth[p] + 1
            self.children[p].append(i)
        self.n_shared = sum(1 for p in self.parent if p >= 0)

    def chunks(self, max_texts: int) -> list[list[int]]:
        """Whole subtrees, in sorted order, grouped into chunks of about ``max_texts`` texts."""
        out: list[list[int]] = [[]]
        for i in self.order:
            if self.parent[i] < 0 and len(out[-1]) >= max_texts:
                out.append([])
            out[-1].append(i)
        return out


def batches(items: list[int], n_tokens: Sequence[int] | Mapping[int, int], max_batch: int, device) -> list[list[int]]:
    """``items`` cut into batches of at most ``max_batch`` that waste little on padding.

    Sorted by length, a batch costs its rows x its longest row in token passes plus a fixed cost per
    forward call; the cheapest contiguous cut is found by dynamic programming. On a CPU a call of
    SmolLM2 costs about as much as 20 tokens (40 ms against 1.9 ms per token, measured), so a batch is
    split where its rows differ by more than that; on a GPU a call costs far more than a token, so
    batches stay full.
    """
    call = CALL_COST_TOKENS if torch.device(device).type == "cpu" else 100 * CALL_COST_TOKENS
    order = sorted(items, key=lambda i: n_tokens[i])
    lens = [n_tokens[i] for i in order]
    n = len(order)
    cost = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):  # cost[j]: the first j items; the last batch is order[i:j], longest lens[j - 1]
        for i in range(max(0, j - max_batch), j):
            c = cost[i] + call + lens[j - 1] * (j - i)
            if c < cost[j]:
                cost[j], cut[j] = c, i
    out, j = [], n
    while j > 0:
        out.append(order[cut[j] : j])
        j = cut[j]
    return out[::-1]


def cache_layers(cache):
    """(keys, values) per layer of a transformers cache ([batch, heads, positions, head_dim] each)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def padded_cache(config, kvs: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]], shared: Sequence[int]):
    """A batch's key/value cache from each row's own: row ``r`` holds the first ``shared[r]`` positions of
    ``kvs[r]`` (per layer ``(keys, values)`` of ``[heads, positions, head_dim]``), zero-padded to the
    batch's largest; returns ``(cache, width)``. Mask the padded positions in the attention mask."""
    from transformers import DynamicCache

    width = max(shared)
    cache = DynamicCache(config=config)
    for layer in range(len(kvs[0])):
        k0, v0 = kvs[0][layer]
        ks = k0.new_zeros((len(kvs), k0.shape[0], width, k0.shape[-1]))
        vs = v0.new_zeros((len(kvs), v0.shape[0], width, v0.shape[-1]))
        for r, (kv, c) in enumerate(zip(kvs, shared, strict=True)):
            ks[r, :, :c], vs[r, :, :c] = kv[layer][0][:, :c], kv[layer][1][:, :c]
        cache.update(ks, vs, layer)
    return cache, width


def repeated_cache(config, kv: Sequence[tuple[torch.Tensor, torch.Tensor]], shared: int, n: int):
    """A batch's key/value cache whose ``n`` rows all hold the first ``shared`` positions of one ``kv``
    (per layer ``(keys, values)`` of ``[heads, positions, head_dim]``): one broadcast per layer, no copy."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for layer, (k, v) in enumerate(kv):
        cache.update(k[:, :shared].unsqueeze(0).expand(n, -1, -1, -1), v[:, :shared].unsqueeze(0).expand(n, -1, -1, -1),
                     layer)
    return cache
