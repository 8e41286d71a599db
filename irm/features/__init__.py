"""Features of base and tuned: sparse autoencoders (sae-lens), dictionary comparison (MMCS), autointerp
with an LLM, and the implicit reward model checked against the features.

The ``features`` pipeline stage and its ``[features]`` config section are in :mod:`irm.features.stage`.

>>> from irm.features import SAETrainConfig, train_sae, compare_dictionaries, decoder_directions
>>> base = train_sae(store, "base", "blocks.3.hook_resid_post", SAETrainConfig(steps=300))
>>> tuned = train_sae(store, "tuned", "blocks.3.hook_resid_post", SAETrainConfig(steps=300))
>>> compare_dictionaries(decoder_directions(base.sae), decoder_directions(tuned.sae)).mmcs
"""

from irm.features.autointerp import (
    FeatureRecord,
    TokenTable,
    classification_messages,
    explain_and_classify,
    explanation_messages,
    feature_snippets,
    lexicon_relevance,
    parse_classification,
    precision_recall,
    wilson_interval,
)
from irm.features.check import (
    activation_rate_check,
    alignment_test,
    feature_attributions,
    feature_irm_weights,
    irm_direction,
)
from irm.features.compare import DictionaryComparison, activation_change, compare_dictionaries, cosine_matrix
from irm.features.sae import (
    SAETrainConfig,
    TrainedSAE,
    decoder_directions,
    effective_decoder,
    encode_rows,
    evaluate_sae,
    load_sae,
    pretrained_sae_ids,
    save_sae,
    store_data_provider,
    train_sae,
)
from irm.features.scoring import ScoreSnippet, ScoringSets, score_explanations, scoring_snippets

__all__ = [
    "DictionaryComparison",
    "FeatureRecord",
    "SAETrainConfig",
    "ScoreSnippet",
    "ScoringSets",
    "TokenTable",
    "TrainedSAE",
    "activation_change",
    "activation_rate_check",
    "alignment_test",
    "classification_messages",
    "compare_dictionaries",
    "cosine_matrix",
    "decoder_directions",
    "effective_decoder",
    "encode_rows",
    "evaluate_sae",
    "explain_and_classify",
    "explanation_messages",
    "feature_attributions",
    "feature_irm_weights",
    "feature_snippets",
    "irm_direction",
    "lexicon_relevance",
    "load_sae",
    "parse_classification",
    "precision_recall",
    "pretrained_sae_ids",
    "save_sae",
    "score_explanations",
    "scoring_snippets",
    "store_data_provider",
    "train_sae",
    "wilson_interval",
]
