"""Explicit reward models behind one interface (:class:`RewardModel`).

Kinds register themselves in :data:`REWARD_MODELS`; ``build_reward_model(kind, **params)`` builds one
from a config section. Every RM is also a trl reward function: ``rm(prompts, completions)``.
"""

from irm.rewards.base import (
    REWARD_MODELS,
    BaseRewardModel,
    Preference,
    RewardModel,
    build_reward_model,
    completion_text,
    register_reward_model,
)
from irm.rewards.classifier import SequenceClassifierRM
from irm.rewards.lexicon import TokenUtilityRM, load_lexicon, vader_lexicon_path
from irm.rewards.spec import load_rm, parse_rm_spec

__all__ = [
    "REWARD_MODELS",
    "BaseRewardModel",
    "Preference",
    "RewardModel",
    "SequenceClassifierRM",
    "TokenUtilityRM",
    "build_reward_model",
    "completion_text",
    "load_lexicon",
    "load_rm",
    "parse_rm_spec",
    "register_reward_model",
    "vader_lexicon_path",
]
