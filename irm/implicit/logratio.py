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

from irm.rewards.base import BaseRewardModel

__all__ = ["response_logprobs", "token_log_ratios", "LogRatioRM"]


@torch.no_grad()
def response_logprobs(
    model,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 256,
) -> list[Float[np.ndarray, " n_response_tokens"]]:
    """``log p(t | ctx)`` of every response token, for each (prompt, response); left-padded batches.

    ``model`` is an :class:`irm.models.LoadedModel`. A token belongs to the response if it covers any
    character of the response (the prompt's tokenisation is not assumed to be a prefix).
    """
    tok = model.tokenizer
    texts = [p + r for p, r in zip(prompts, responses, strict=True)]
    enc = tok(texts, add_special_tokens=True, truncation=True, max_length=max_length, return_offsets_mapping=True)
    out: list[np.ndarray] = [np.zeros(0)] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: len(enc["input_ids"][i]))
    dev = model.device
    for b0 in range(0, len(order), batch_size):
        batch = order[b0 : b0 + batch_size]
        lens = [len(enc["input_ids"][i]) for i in batch]
        width = max(lens)
        ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, width - lens[r]:] = torch.tensor(enc["input_ids"][i])
            mask[r, width - lens[r]:] = 1
        # Only response tokens need logits: run the decoder, then the unembedding at those positions
        # alone (the vocabulary projection and its softmax dominate the cost for short responses).
        rows, cols, targets, owners = [], [], [], []
        for r, i in enumerate(batch):
            offs = np.asarray(enc["offset_mapping"][i]).reshape(-1, 2)
            in_resp = offs[:, 1] > len(prompts[i])
            in_resp[0] = False  # the first token has no context to be predicted from
            pos = np.nonzero(in_resp)[0] + (width - lens[r])
            rows += [r] * len(pos)
            cols += (pos - 1).tolist()
            targets += ids[r, pos].tolist()
            owners.append((i, len(pos)))
        hidden = _final_hidden(model.hf_model, ids.to(dev), mask.to(dev))
        h = hidden[torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)]
        logits = model.hf_model.get_output_embeddings()(h).float()
        lp = (logits.gather(-1, torch.tensor(targets, device=logits.device)[:, None])[:, 0]
              - torch.logsumexp(logits, -1)).cpu().numpy().astype(np.float64)
        k = 0
        for i, n_pos in owners:
            out[i] = lp[k : k + n_pos]
            k += n_pos
    return out


def _final_hidden(hf_model, ids, mask):
    """The last hidden state the unembedding reads (after the final norm), without computing logits."""
    cfg = hf_model.config
    if getattr(cfg, "final_logit_softcapping", None) or hf_model.get_output_embeddings() is None:
        raise NotImplementedError(
            f"{cfg.model_type} post-processes its logits; response_logprobs supports plain unembeddings.")
    return hf_model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state


def token_log_ratios(
    pair, prompts: Sequence[str], responses: Sequence[str], *, beta: float = 1.0, **kw
) -> list[np.ndarray]:
    """``beta * (log p_tuned - log p_base)`` of every response token: one array per response."""
    lt = response_logprobs(pair.tuned, prompts, responses, **kw)
    lb = response_logprobs(pair.base, prompts, responses, **kw)
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

