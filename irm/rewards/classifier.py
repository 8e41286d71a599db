"""Any Hugging Face ``AutoModelForSequenceClassification`` used as a reward model.

Reward models on the hub come in two shapes, and both work here:

- a scalar head (``num_labels == 1``), e.g. ``OpenAssistant/reward-model-deberta-v3-large-v2``: the
  reward is that logit;
- a classifier, e.g. a sentiment model: the reward is the logit of one label (``label="POSITIVE"`` or
  an index), as the paper's alternative "positive logit" RM.

How (prompt, response) becomes model input is ``input_format``: ``"pair"`` (the tokenizer's text
pair, what the OpenAssistant RMs were trained on), ``"concat"`` (prompt + response as one text) or
``"chat"`` (the tokenizer's chat template with a user and an assistant turn).

>>> rm = SequenceClassifierRM.from_pretrained("OpenAssistant/reward-model-deberta-v3-base")
>>> rm.score(["How do I bake bread?"], ["Mix flour, water, yeast and salt, then ..."])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from irm.rewards.base import BaseRewardModel, register_reward_model

__all__ = ["SequenceClassifierRM"]

InputFormat = Literal["pair", "concat", "chat"]


class SequenceClassifierRM(BaseRewardModel):
    def __init__(
        self,
        model,
        tokenizer,
        *,
        label: int | str | None = None,
        input_format: InputFormat = "pair",
        batch_size: int = 16,
        max_length: int = 512,
        device: str | torch.device | None = None,
        name: str | None = None,
    ) -> None:
        if input_format not in ("pair", "concat", "chat"):
            raise ValueError(f"input_format must be 'pair', 'concat' or 'chat', got {input_format!r}.")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.input_format = input_format
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        self.label_index = self._resolve_label(label)
        self.name = name or str(getattr(model.config, "_name_or_path", "classifier")).rstrip("/").split("/")[-1]
        if self.tokenizer.pad_token is None:
            # Reward heads read a pooled or last-token state; a pad token is needed to batch at all.
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
            if getattr(self.model.config, "pad_token_id", None) is None:
                self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def _resolve_label(self, label: int | str | None) -> int:
        n = int(self.model.config.num_labels)
        if label is None:
            if n == 1:
                return 0
            raise ValueError(
                f"This classifier has {n} labels {self.model.config.id2label}; say which one is the reward "
                "with label=<name or index> (e.g. label='POSITIVE' for a sentiment model)."
            )
        if isinstance(label, str) and not label.lstrip("-").isdigit():
            label2id = {k.lower(): v for k, v in self.model.config.label2id.items()}
            if label.lower() not in label2id:
                raise ValueError(f"Label {label!r} not found; valid labels are {list(self.model.config.label2id)}.")
            return int(label2id[label.lower()])
        idx = int(label)
        if not -n <= idx < n:
            raise ValueError(f"Label index {idx} is out of range for a classifier with {n} labels.")
        return idx % n

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, *, revision: str | None = None, device: str | None = None, **kwargs
    ) -> SequenceClassifierRM:
        """Load from the hub (offline from its cache with ``HF_HUB_OFFLINE=1``) or a local directory."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
            model = AutoModelForSequenceClassification.from_pretrained(name_or_path, revision=revision)
        except OSError as e:
            raise OSError(
                f"Could not load the reward model {name_or_path!r}: it is neither a local directory nor a "
                "hub model in the local Hugging Face cache (is the network reachable?). Point `path` at a "
                "directory saved with save_pretrained, or run once online to fill the cache."
            ) from e
        return cls(model, tok, device=device, **kwargs)

    def _encode(self, prompts: Sequence[str], responses: Sequence[str]):
        kw = dict(padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        if self.input_format == "pair":
            return self.tokenizer(list(prompts), list(responses), **kw)
        if self.input_format == "concat":
            return self.tokenizer([p + r for p, r in zip(prompts, responses, strict=True)], **kw)
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
            )
            for p, r in zip(prompts, responses, strict=True)
        ]
        return self.tokenizer(texts, **kw)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        self._check_batch(prompts, responses)
        out = np.empty(len(prompts), dtype=np.float64)
        for i in range(0, len(prompts), self.batch_size):
            enc = self._encode(prompts[i : i + self.batch_size], responses[i : i + self.batch_size])
            enc = {k: v.to(self.device) for k, v in enc.items()}
            logits = self.model(**enc).logits
            out[i : i + len(logits)] = logits[:, self.label_index].double().cpu().numpy()
        return out


@register_reward_model("classifier")
def _build_classifier(
    path: str,
    label: int | str | None = None,
    input_format: InputFormat = "pair",
    batch_size: int = 16,
    max_length: int = 512,
    revision: str | None = None,
    device: str | None = None,
    name: str | None = None,
) -> SequenceClassifierRM:
    """``kind = "classifier"``: a hub name or local directory of a sequence-classification model."""
    return SequenceClassifierRM.from_pretrained(
        path,
        revision=revision,
        device=device,
        label=label,
        input_format=input_format,
        batch_size=batch_size,
        max_length=max_length,
        name=name,
    )
