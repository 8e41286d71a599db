"""Contrastive explanations of reward-model comparisons (Jiang et al., ICLR 2025, arXiv 2411.16502).

Which high-level attributes of a response does a reward model react to? Perturb the responses of
binary comparisons along one attribute at a time and watch which perturbations flip the RM's
preference (counterfactuals) and which keep it (semifactuals); aggregate into per-attribute
preference flip rates. Works for any :class:`irm.rewards.RewardModel`: the explicit lexicon RM, the
implicit reward models of a tuned model, Hugging Face classifier RMs.

- :mod:`~irm.contrastive.attributes`: the attribute registry (8 built-ins), programmatic edits, scorers;
- :mod:`~irm.contrastive.perturb`: generators (programmatic, two-step LLM rewrite) and the random baseline;
- :mod:`~irm.contrastive.explain`: :func:`explain` and :class:`ContrastiveResult` (coverage, distances,
  diversity, PFR, rankings, Kendall tau, representative examples, disagreement, validity);
- :mod:`~irm.contrastive.comparisons`: comparisons from files, hub datasets, the packaged sample or
  generations of the model pair;
- :mod:`~irm.contrastive.fluency`: perplexity of perturbations under an LM (disfluent ones are dropped);
- :mod:`~irm.contrastive.report`: plots, ``contrastive.md``, the terminal headline;
- :mod:`~irm.contrastive.standalone`: :func:`explain_rms`, any RM specs on any comparisons file
  (``irm explain --rm SPEC --comparisons FILE``), no pipeline;
- :mod:`~irm.contrastive.stage`: the ``[contrastive]`` config section and pipeline stage.

>>> from irm.contrastive import explain, load_comparisons
>>> from irm.rewards import TokenUtilityRM
>>> res = explain(load_comparisons("sample", limit=30), [TokenUtilityRM.from_vader()], embedder=None)
>>> res.summary()["sensitivity"]["vader"]["programmatic"]["top"]
'sentiment'
"""

from irm.contrastive.attributes import (
    ATTRIBUTES,
    Attribute,
    get_attribute,
    register_attribute,
    resolve_attributes,
)
from irm.contrastive.comparisons import (
    check_comparisons_source,
    comparisons_from_model,
    comparisons_from_pair,
    load_comparisons,
    order_by_rm,
    split_hh_dialogue,
)
from irm.contrastive.explain import TARGETS, Candidate, Comparison, ContrastiveResult, explain, tie_margins
from irm.contrastive.fluency import LMFluency
from irm.contrastive.metrics import MiniLMEmbedder
from irm.contrastive.perturb import (
    GENERATORS,
    LLMRewriteGenerator,
    Perturbation,
    PerturbationGenerator,
    ProgrammaticGenerator,
    RandomSubstitution,
    build_generator,
    neutral_vocabulary,
    register_generator,
)
from irm.contrastive.standalone import check_rm_specs, explain_rms
from irm.contrastive.textops import Edit, EditResult

__all__ = [
    "ATTRIBUTES",
    "Attribute",
    "Candidate",
    "Comparison",
    "ContrastiveResult",
    "Edit",
    "EditResult",
    "GENERATORS",
    "LLMRewriteGenerator",
    "MiniLMEmbedder",
    "Perturbation",
    "PerturbationGenerator",
    "ProgrammaticGenerator",
    "RandomSubstitution",
    "TARGETS",
    "build_generator",
    "comparisons_from_model",
    "comparisons_from_pair",
    "check_comparisons_source",
    "check_rm_specs",
    "explain",
    "explain_rms",
    "LMFluency",
    "neutral_vocabulary",
    "tie_margins",
    "get_attribute",
    "load_comparisons",
    "order_by_rm",
    "register_attribute",
    "register_generator",
    "resolve_attributes",
    "split_hh_dialogue",
]
