"""The base/tuned model pair: two loaded models checked to be comparable."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from irm.models.loading import LoadedModel, load_model

__all__ = ["ModelPair", "ModelPairMismatch"]



# ----------------------------------------------------------------------------------------------
class ModelPairMismatch(ValueError):
    """Base and tuned do not fit together (vocabulary, architecture or width differ)."""


def _vocab_digest(tok) -> str:
    items = sorted(tok.get_vocab().items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


@dataclass
class ModelPair:
    """A base model and its RLHF-tuned copy. Construction checks that they are comparable."""

    base: LoadedModel
    tuned: LoadedModel

    def __post_init__(self) -> None:
        b, t = self.base, self.tuned
        problems = []
        b_arch = getattr(b.config, "model_type", None)
        t_arch = getattr(t.config, "model_type", None)
        if b_arch != t_arch:
            problems.append(f"architecture: base is {b_arch!r}, tuned is {t_arch!r}")
        if b.d_model != t.d_model:
            problems.append(f"d_model: base has {b.d_model}, tuned has {t.d_model}")
        if b.n_layers != t.n_layers:
            problems.append(f"n_layers: base has {b.n_layers}, tuned has {t.n_layers}")
        bv, tv = len(b.tokenizer), len(t.tokenizer)
        if bv != tv:
            problems.append(f"vocabulary size: base tokenizer has {bv} tokens, tuned has {tv}")
        elif _vocab_digest(b.tokenizer) != _vocab_digest(t.tokenizer):
            diff = [k for k, v in b.tokenizer.get_vocab().items() if t.tokenizer.get_vocab().get(k) != v]
            problems.append(f"vocabulary: {len(diff)} tokens map to different ids (e.g. {diff[:3]})")
        if problems:
            raise ModelPairMismatch(
                f"Base {b.identity.spec!r} and tuned {t.identity.spec!r} do not form a pair: "
                + "; ".join(problems)
                + ". A tuned model must be a fine-tuned copy of the base (same tokenizer and shape)."
            )

    @classmethod
    def load(cls, base: str, tuned: str, **kwargs) -> ModelPair:
        return cls(load_model(base, **kwargs), load_model(tuned, **kwargs))

    def identities(self) -> dict[str, dict[str, Any]]:
        return {"base": self.base.identity.to_dict(), "tuned": self.tuned.identity.to_dict()}

    def __iter__(self):
        yield from (("base", self.base), ("tuned", self.tuned))
