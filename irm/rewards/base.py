"""The one interface every reward model in irm speaks.

A reward model (RM) scores (prompt, response) pairs. Everything else, comparisons, trl reward
functions, contrastive explanations, is built on :meth:`RewardModel.score`.

>>> rm = TokenUtilityRM.from_vader()
>>> rm.score(["The movie was"], [" great fun"])   # -> array([0.98])
>>> rm.compare("The movie was", " great", " awful").preferred   # -> "a"
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "Preference",
    "RewardModel",
    "BaseRewardModel",
    "register_reward_model",
    "build_reward_model",
    "REWARD_MODELS",
    "PLUGIN_KINDS",
    "reward_model_kinds",
    "completion_text",
]


@dataclass(frozen=True)
class Preference:
    """The outcome of one binary comparison: which response an RM prefers and by how much.

    ``margin = reward_a - reward_b``; ``preferred`` is ``"a"`` when the margin is positive,
    ``"b"`` when negative and ``"tie"`` when it is exactly zero.
    """

    reward_a: float
    reward_b: float

    @property
    def margin(self) -> float:
        return self.reward_a - self.reward_b

    @property
    def preferred(self) -> Literal["a", "b", "tie"]:
        if self.margin > 0:
            return "a"
        if self.margin < 0:
            return "b"
        return "tie"


@runtime_checkable
class RewardModel(Protocol):
    """What irm asks of a reward model. Subclass :class:`BaseRewardModel` to get the rest for free."""

    name: str

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Rewards of a batch: ``float64[n]`` for ``n`` (prompt, response) pairs."""
        ...

    def compare(self, prompt: str, response_a: str, response_b: str) -> Preference: ...

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        """trl reward-function signature: ``f(prompts, completions, **kw) -> list[float]``."""
        ...


def completion_text(x: Any) -> str:
    """Plain text of a trl prompt/completion, which is either a string or a list of chat messages."""
    if isinstance(x, str):
        return x
    if isinstance(x, dict) and "content" in x:
        return str(x["content"])
    if isinstance(x, Sequence):
        return "".join(completion_text(m) for m in x)
    raise TypeError(
        f"Expected a string or a list of chat messages ({{'role', 'content'}} dicts), got {type(x).__name__}."
    )


class BaseRewardModel(ABC):
    """Base class: implement :meth:`score`; comparisons and the trl adapter come from here."""

    name: str = "reward_model"

    @abstractmethod
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Rewards of a batch: ``float64[n]``."""

    def _check_batch(self, prompts: Sequence[str], responses: Sequence[str]) -> None:
        if isinstance(prompts, str) or isinstance(responses, str):
            raise TypeError(
                f"{type(self).__name__}.score takes sequences of strings, got a single string; "
                "wrap it in a list: rm.score([prompt], [response])."
            )
        if len(prompts) != len(responses):
            raise ValueError(
                f"{type(self).__name__}.score got {len(prompts)} prompts but {len(responses)} responses; "
                "they must pair up one to one."
            )

    def compare(self, prompt: str, response_a: str, response_b: str) -> Preference:
        r = self.score([prompt, prompt], [response_a, response_b])
        return Preference(float(r[0]), float(r[1]))

    def compare_batch(
        self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]
    ) -> np.ndarray:
        """Margins ``score(a) - score(b)`` of many comparisons in two batched calls: ``float64[n]``."""
        return self.score(prompts, responses_a) - self.score(prompts, responses_b)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        p = [completion_text(x) for x in prompts]
        c = [completion_text(x) for x in completions]
        out = self.score(p, c)
        bad = [i for i, v in enumerate(out) if not math.isfinite(float(v))]
        if bad:
            raise FloatingPointError(
                f"{self.name} returned non-finite rewards at positions {bad[:5]} "
                f"(e.g. completion {c[bad[0]]!r}); a NaN reward would corrupt training."
            )
        return [float(v) for v in out]

    @property
    def __name__(self) -> str:  # trl names reward functions in its logs by __name__
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# ----------------------------------------------------------------------------------------------
# Registry: a new RM kind is a new module that registers itself, not an edit of an if/elif chain.
REWARD_MODELS: dict[str, Callable[..., BaseRewardModel]] = {}
#: Kinds that live in packages above this one (they run the model pair): imported by name the first
#: time they are asked for, so this package never imports them.
PLUGIN_KINDS: dict[str, str] = {
    "logratio": "irm.implicit.logratio",
    "probe": "irm.implicit.probe_rm",
}


def reward_model_kinds() -> list[str]:
    return sorted(set(REWARD_MODELS) | set(PLUGIN_KINDS))


def _ensure_kind(kind: str) -> None:
    if kind not in REWARD_MODELS and kind in PLUGIN_KINDS:
        import importlib

        importlib.import_module(PLUGIN_KINDS[kind])


def register_reward_model(kind: str) -> Callable[[Callable[..., BaseRewardModel]], Callable[..., BaseRewardModel]]:
    def deco(factory: Callable[..., BaseRewardModel]) -> Callable[..., BaseRewardModel]:
        if kind in REWARD_MODELS:
            raise ValueError(f"Reward model kind {kind!r} is registered twice.")
        REWARD_MODELS[kind] = factory
        return factory

    return deco


def build_reward_model(kind: str, **params: Any) -> BaseRewardModel:
    """Build a registered RM: ``build_reward_model("lexicon", path=None)``."""
    _ensure_kind(kind)
    if kind not in REWARD_MODELS:
        import difflib

        close = difflib.get_close_matches(kind, reward_model_kinds(), n=3)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Unknown reward model kind {kind!r}. Valid kinds are {reward_model_kinds()}.{hint}"
        )
    return REWARD_MODELS[kind](**params)
