"""Linear probes with scikit-learn estimator semantics.

* :class:`RidgeProbe` -- ridge regression, fitted through
  :class:`~probes.streaming.RidgeSufficientStats` (one implementation for the
  in-memory and the streaming/distributed paths); ``alpha="auto"`` picks the
  penalty by GCV.
* :class:`LogisticProbe` -- L2 logistic regression (binary or multinomial).
* :class:`PairwiseProbe` -- Bradley-Terry preference probe on feature
  differences, ``P(a ≻ b) = sigmoid(w · (x_a - x_b))``.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
from scipy.special import expit, log_expit, log_softmax, softmax
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.linear_model import LogisticRegression
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_is_fitted, validate_data

from ._utils import to_numpy
from .streaming import RidgeSufficientStats

__all__ = ["LogisticProbe", "PairwiseProbe", "RidgeProbe", "pairwise_differences"]


def _check_positive_real(value: Any, name: str, owner: str, *, strict: bool) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and np.isfinite(value) and (value > 0 if strict else value >= 0)
    if not ok:
        bound = "> 0" if strict else ">= 0"
        raise ValueError(
            f"{owner}: {name} must be a finite real number {bound}; received {value!r}."
        )


def _check_positive_int(value: Any, name: str, owner: str) -> None:
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool)
            and value >= 1):
        raise ValueError(f"{owner}: {name} must be an integer >= 1; received {value!r}.")


# --------------------------------------------------------------------- ridge
class RidgeProbe(RegressorMixin, BaseEstimator):
    """Ridge regression probe, ``argmin ||y - Xw - b||² + alpha ||w||²``.

    Same solution as ``sklearn.linear_model.Ridge`` (unpenalised intercept),
    computed from float64 sufficient statistics. Use :meth:`fit_stats` to fit
    from statistics accumulated shard by shard or across processes.

    Parameters
    ----------
    alpha : float >= 0 or "auto", default=1.0
        Penalty. ``"auto"`` chooses it per target by generalised
        cross-validation over ``alphas``.
    fit_intercept : bool, default=True
    standardize : bool, default=False
        Penalise coefficients of unit-variance features (like a
        ``StandardScaler`` in front); ``coef_`` is still in original units.
    alphas : array-like of shape [m], optional
        Absolute GCV grid for ``alpha="auto"``; default is
        ``logspace(-3, 6, 40)`` × mean feature variance (see
        :meth:`RidgeSufficientStats.alpha_grid`). Ignored otherwise.

    Attributes
    ----------
    coef_ : ndarray of shape [d] (y of shape [n]) or [k, d] (y of shape [n, k])
    intercept_ : float or ndarray of shape [k]
    alpha_ : float or ndarray of shape [k]
        Penalty used (chosen one(s) for ``"auto"``).
    alphas_, gcv_scores_ : ndarray of shape [m] and [m] or [m, k]
        Grid and GCV criterion; only set when ``alpha="auto"``.
    n_features_in_ : int

    Example::

        probe = RidgeProbe(alpha="auto").fit(X_train, y_train)   # X [n, d], y [n]
        r = probe.predict(X_test)                                # [n_test]
    """

    def __init__(self, alpha=1.0, *, fit_intercept=True,
                 standardize=False, alphas=None):
        self.alpha = alpha
        self.fit_intercept = fit_intercept
        self.standardize = standardize
        self.alphas = alphas

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _validate_params_(self) -> None:
        if isinstance(self.alpha, str):
            if self.alpha != "auto":
                raise ValueError(
                    f"RidgeProbe: alpha must be a float >= 0 or 'auto'; "
                    f"received {self.alpha!r}."
                )
        else:
            _check_positive_real(self.alpha, "alpha", "RidgeProbe", strict=False)

    def fit(self, X, y):
        """Fit on X [n, d] and y [n] or [n, k]; returns self."""
        self._validate_params_()
        X, y = validate_data(
            self, X, y, multi_output=True, y_numeric=True, dtype=np.float64
        )
        stats = RidgeSufficientStats().update(X, y)
        return self._fit_from(stats)

    def fit_stats(self, stats: RidgeSufficientStats) -> RidgeProbe:
        """Fit from accumulated :class:`RidgeSufficientStats`; returns self.

        Example::

            stats = RidgeSufficientStats(); [stats.update(Xs, ys) for Xs, ys in shards]
            probe = RidgeProbe(alpha="auto").fit_stats(stats)
        """
        self._validate_params_()
        if not isinstance(stats, RidgeSufficientStats):
            raise TypeError(
                f"fit_stats expects a RidgeSufficientStats; received "
                f"{type(stats).__name__}."
            )
        # Column names, if any, came from an earlier fit(X) and no longer apply.
        self.__dict__.pop("feature_names_in_", None)
        self.n_features_in_ = stats.n_features
        return self._fit_from(stats)

    def _fit_from(self, stats: RidgeSufficientStats) -> RidgeProbe:
        fit_intercept, standardize = bool(self.fit_intercept), bool(self.standardize)
        if isinstance(self.alpha, str):  # "auto"
            res = stats.solve_gcv(
                None if self.alphas is None else np.asarray(self.alphas, dtype=float),
                fit_intercept=fit_intercept,
                standardize=standardize,
            )
            self.coef_, self.intercept_, self.alpha_ = res.coef, res.intercept, res.alpha
            self.alphas_, self.gcv_scores_ = res.alphas, res.gcv_scores
        else:
            self.coef_, self.intercept_ = stats.solve(
                float(self.alpha), fit_intercept=fit_intercept, standardize=standardize
            )
            self.alpha_ = float(self.alpha)
            # A refit with a fixed alpha must not leave a stale GCV result behind.
            self.__dict__.pop("alphas_", None)
            self.__dict__.pop("gcv_scores_", None)
        return self

    def predict(self, X):
        """Predictions for X [n, d]: shape [n] or [n, k] like the training y."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return X @ self.coef_.T + self.intercept_


# ------------------------------------------------------------------ logistic
def _fit_logistic(X, y, *, C, fit_intercept, standardize, max_iter, tol):
    """L2 logistic regression via sklearn's lbfgs, optionally on scaled X.

    Returns (coef [K', d], intercept [K'], n_iter) in the original feature
    units, K' = 1 for two classes.
    """
    if standardize:
        # Centring only when an intercept can absorb it; scaling by the std keeps
        # lbfgs well conditioned on activations whose features span decades.
        shift = X.mean(0) if fit_intercept else np.zeros(X.shape[1])
        scale = X.std(0)
        scale[scale == 0] = 1.0
        Xs = (X - shift) / scale
    else:
        shift, scale, Xs = np.zeros(X.shape[1]), np.ones(X.shape[1]), X
    model = LogisticRegression(
        C=C, fit_intercept=fit_intercept, max_iter=max_iter, tol=tol, solver="lbfgs"
    ).fit(Xs, y)
    coef = model.coef_ / scale
    # lbfgs leaves the intercept unpenalised, so moving the shift into it is exact.
    intercept = model.intercept_ - coef @ shift
    return coef, intercept, model.n_iter_


class _LogitMixin:
    """decision_function / predict / predict_proba from ``coef_``, ``intercept_``."""

    def decision_function(self, X):
        """Scores: shape [n] for two classes (log-odds of ``classes_[1]``), else [n, K]."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        scores = X @ np.atleast_2d(self.coef_).T + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores

    def predict_proba(self, X):
        """Class probabilities, shape [n, K], columns ordered as ``classes_``."""
        scores = self.decision_function(X)
        if scores.ndim == 1:
            p = expit(scores)
            return np.column_stack([1.0 - p, p])
        return softmax(scores, axis=1)

    def predict_log_proba(self, X):
        """Log class probabilities, shape [n, K] (computed stably from the scores)."""
        scores = self.decision_function(X)
        if scores.ndim == 1:
            return np.column_stack([log_expit(-scores), log_expit(scores)])
        return log_softmax(scores, axis=1)

    def predict(self, X):
        """Most probable class per row, shape [n]."""
        scores = self.decision_function(X)
        idx = (scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(1)
        return self.classes_[idx]


class LogisticProbe(_LogitMixin, ClassifierMixin, BaseEstimator):
    """L2-regularised logistic regression probe (binary or multinomial).

    A thin, validated wrapper around ``LogisticRegression(solver="lbfgs")``
    that adds optional feature standardisation for badly scaled activations.

    Parameters
    ----------
    C : float > 0, default=1.0
        Inverse penalty strength (as in sklearn).
    fit_intercept : bool, default=True
    standardize : bool, default=False
        Fit on unit-variance features (penalty in those units); ``coef_`` is
        returned in original units.
    max_iter : int, default=1000
    tol : float, default=1e-6

    Attributes
    ----------
    classes_ : ndarray of shape [K]
    coef_ : ndarray of shape [1, d] (K = 2) or [K, d]
    intercept_ : ndarray of shape [1] or [K]
    n_iter_ : ndarray of shape [1]
    n_features_in_ : int

    Example::

        probe = LogisticProbe(C=0.1).fit(X_train, labels)        # X [n, d]
        p = probe.predict_proba(X_test)[:, 1]                    # [n_test]
    """

    def __init__(self, C=1.0, *, fit_intercept=True, standardize=False,
                 max_iter=1000, tol=1e-6):
        self.C = C
        self.fit_intercept = fit_intercept
        self.standardize = standardize
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, X, y):
        """Fit on X [n, d] and class labels y [n]; returns self."""
        _check_positive_real(self.C, "C", "LogisticProbe", strict=True)
        _check_positive_real(self.tol, "tol", "LogisticProbe", strict=True)
        _check_positive_int(self.max_iter, "max_iter", "LogisticProbe")
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        classes = np.unique(y)
        if len(classes) < 2:
            raise ValueError(
                f"LogisticProbe needs samples of at least 2 classes; y contains "
                f"only one class: {classes[0]!r}."
            )
        self.coef_, self.intercept_, self.n_iter_ = _fit_logistic(
            X, y, C=float(self.C), fit_intercept=bool(self.fit_intercept),
            standardize=bool(self.standardize), max_iter=self.max_iter, tol=self.tol,
        )
        self.classes_ = classes
        return self


# ------------------------------------------------------------------ pairwise
def pairwise_differences(X_a: Any, X_b: Any) -> np.ndarray:
    """Feature differences ``X_a - X_b`` [n, d] in float64, the input of PairwiseProbe.

    Accepts numpy arrays or torch tensors of identical shape [n, d].

    Example::

        D = pairwise_differences(emb_a, emb_b)                  # [n_pairs, d]
        probe = PairwiseProbe().fit(D, a_preferred)             # a_preferred in {0, 1}
    """
    A = to_numpy(X_a, name="X_a")
    B = to_numpy(X_b, name="X_b")
    if A.ndim != 2 or A.shape != B.shape:
        raise ValueError(
            f"X_a and X_b must both have shape [n_pairs, n_features]; received "
            f"{A.shape} and {B.shape}."
        )
    return A - B


class PairwiseProbe(_LogitMixin, ClassifierMixin, BaseEstimator):
    """Bradley-Terry preference probe: ``P(a ≻ b) = sigmoid(w · (x_a - x_b))``.

    ``X`` holds pair feature *differences* ``x_a - x_b`` (see
    :func:`pairwise_differences`) and ``y`` says whether ``a`` was preferred
    (``y == classes_[1]``, e.g. 1) or not. The model is L2 logistic regression
    without intercept, so it is antisymmetric: swapping a and b flips the
    probability, ``P(b ≻ a) = 1 - P(a ≻ b)``. ``w`` is a reward direction:
    :meth:`score_items` gives each item the scalar reward ``x · w``.

    Parameters
    ----------
    C : float > 0, default=1.0
    standardize : bool, default=False
        Scale (never centre: that would break antisymmetry) the differences to
        unit variance during fitting; ``coef_`` is in original units.
    max_iter : int, default=1000
    tol : float, default=1e-6

    Attributes
    ----------
    classes_ : ndarray of shape [2]
    coef_ : ndarray of shape [d]
        Reward direction ``w``.
    intercept_ : float
        Always 0.0 (kept for sklearn-style consumers).
    n_iter_ : ndarray of shape [1]
    n_features_in_ : int

    Notes
    -----
    If all pairs are oriented preferred-first (y all 1), randomly swap half of
    them (negating the row and flipping its label) so both classes are present;
    the likelihood is unchanged. There is deliberately no intercept: a bias
    term would make ``P(a ≻ b) ≠ 1 - P(b ≻ a)`` (a position bias).

    Example::

        probe = PairwiseProbe(C=1.0).fit(pairwise_differences(X_a, X_b), a_wins)
        rewards = probe.score_items(X_items)                     # [n_items]
    """

    def __init__(self, C=1.0, *, standardize=False, max_iter=1000, tol=1e-6):
        self.C = C
        self.standardize = standardize
        self.max_iter = max_iter
        self.tol = tol

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # A preference is binary: a preferred over b, or not.
        tags.classifier_tags.multi_class = False
        return tags

    def fit(self, X, y):
        """Fit on differences X [n, d] and binary preferences y [n]; returns self."""
        _check_positive_real(self.C, "C", "PairwiseProbe", strict=True)
        _check_positive_real(self.tol, "tol", "PairwiseProbe", strict=True)
        _check_positive_int(self.max_iter, "max_iter", "PairwiseProbe")
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        classes = np.unique(y)
        if len(classes) != 2:
            # "Only binary classification is supported." is the phrase sklearn's
            # conformance check for binary-only classifiers looks for.
            raise ValueError(
                f"Only binary classification is supported. PairwiseProbe needs binary "
                f"preferences (a preferred or not); y is {type_of_target(y)} with "
                f"{len(classes)} class(es): {classes.tolist()[:10]}. If every pair is "
                "oriented preferred-first, swap a random half (negate X rows, flip labels)."
            )
        coef, _, self.n_iter_ = _fit_logistic(
            X, y, C=float(self.C), fit_intercept=False,
            standardize=bool(self.standardize), max_iter=self.max_iter, tol=self.tol,
        )
        self.coef_ = coef[0]
        self.intercept_ = 0.0
        self.classes_ = classes
        return self

    def score_items(self, X):
        """Scalar Bradley-Terry reward per item, ``X @ coef_``: X [n, d] -> [n]."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return X @ self.coef_

    @staticmethod
    def pairwise_differences(X_a, X_b) -> np.ndarray:
        """Same as the module-level :func:`pairwise_differences`."""
        return pairwise_differences(X_a, X_b)
