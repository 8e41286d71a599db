"""Linear probes, exact streaming ridge and ranking metrics.

numpy/torch arrays in, numbers out; no dependency on the rest of the toolkit.

Example::

    from probes import RidgeProbe, evaluate_all
    results = evaluate_all(y_test, RidgeProbe(alpha="auto").fit(X, y).predict(X_test))
"""

from .linear import LogisticProbe, PairwiseProbe, RidgeProbe, pairwise_differences
from .metrics import (
    MetricResult,
    bootstrap_ci,
    evaluate_all,
    kendall_tau,
    pairwise_accuracy,
    roc_auc,
    sign_agreement,
    spearman,
    top_k_overlap,
)
from .streaming import (
    DEFAULT_RELATIVE_ALPHAS,
    SUM_KEYS,
    GCVResult,
    RidgeSufficientStats,
)

__all__ = [
    "DEFAULT_RELATIVE_ALPHAS",
    "GCVResult",
    "LogisticProbe",
    "MetricResult",
    "PairwiseProbe",
    "RidgeProbe",
    "RidgeSufficientStats",
    "SUM_KEYS",
    "bootstrap_ci",
    "evaluate_all",
    "kendall_tau",
    "pairwise_accuracy",
    "pairwise_differences",
    "roc_auc",
    "sign_agreement",
    "spearman",
    "top_k_overlap",
]
