"""Tests for the probes package: estimators, streaming ridge, metrics."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.linear_model import LogisticRegression, Ridge, RidgeCV
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from probes import (
    DEFAULT_RELATIVE_ALPHAS,
    SUM_KEYS,
    LogisticProbe,
    MetricResult,
    PairwiseProbe,
    RidgeProbe,
    RidgeSufficientStats,
    bootstrap_ci,
    evaluate_all,
    kendall_tau,
    pairwise_accuracy,
    pairwise_differences,
    roc_auc,
    sign_agreement,
    spearman,
    top_k_overlap,
)
from probes.metrics import _count_inversions

# ------------------------------------------------------------------ helpers


def _regression_data(n=600, d=12, k=None, seed=0, offset=3.0, noise=0.5):
    """Correlated, non-centred, unevenly scaled features (like activations)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    X = rng.normal(size=(n, d)) @ mix * rng.uniform(0.2, 5.0, d) + offset * rng.normal(size=d)
    shape = (d,) if k is None else (d, k)
    W = rng.normal(size=shape)
    y = X @ W + noise * rng.normal(size=(n,) if k is None else (n, k)) + 1.5
    return X, y


def _rel_diff(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)


def _stats_in_shards(X, y, n_shards):
    stats = RidgeSufficientStats()
    for idx in np.array_split(np.arange(len(X)), n_shards):
        stats.update(X[idx], y[idx])
    return stats


# ------------------------------------------------------ sklearn conformance


# No check is expected to fail: an empty dict with xfail_strict means a check
# that starts failing shows up as a failure. check_array_api_input runs only when
# SCIPY_ARRAY_API=1 was set before scipy was imported (else sklearn skips it), so
# it is taken out of this list and test_array_api_check_in_subprocess runs it on
# every configuration, in a fresh interpreter with that variable set.
PROBE_CONFIGS = [
    RidgeProbe(),
    RidgeProbe(alpha="auto", standardize=True),
    RidgeProbe(alpha=0.1, fit_intercept=False),
    LogisticProbe(),
    LogisticProbe(C=10.0, standardize=True),
    PairwiseProbe(),
    PairwiseProbe(standardize=True),
]
_SUBPROCESS_CHECKS = ("check_array_api_input",)


def _check_name(param) -> str:
    _, check = param.values if hasattr(param, "values") else param
    return getattr(check, "func", check).__name__


_checks = parametrize_with_checks(PROBE_CONFIGS, expected_failed_checks=lambda est: {}, xfail_strict=True)
_params = [p for p in _checks.args[1] if _check_name(p) not in _SUBPROCESS_CHECKS]


@pytest.mark.parametrize(_checks.args[0], _params, **_checks.kwargs)
def test_sklearn_compatible(estimator, check):
    check(estimator)


def test_sklearn_checks_cover_every_config_and_only_move_the_array_api_check():
    names = {_check_name(p) for p in _checks.args[1]}
    assert set(_SUBPROCESS_CHECKS) <= names  # sklearn still has the check the subprocess runs
    assert len(_checks.args[1]) - len(_params) == len(PROBE_CONFIGS) * len(_SUBPROCESS_CHECKS)


def test_array_api_check_in_subprocess():
    # scipy reads SCIPY_ARRAY_API at import time, so it needs a fresh interpreter.
    code = (
        "from sklearn.utils.estimator_checks import check_array_api_input\n"
        "from probes import RidgeProbe, LogisticProbe, PairwiseProbe\n"
        f"configs = [{', '.join(repr(e) for e in PROBE_CONFIGS)}]\n"
        "for est in configs:\n"
        "    check_array_api_input(type(est).__name__, est, array_namespace='numpy',\n"
        "                          expect_only_array_outputs=False)\n"
        "print('ok', len(configs))\n"
    )
    env = {**os.environ, "SCIPY_ARRAY_API": "1"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == f"ok {len(PROBE_CONFIGS)}", proc.stderr[-3000:]


# ------------------------------------------------------ streaming ridge == sklearn


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("n_shards", [1, 7])
def test_streaming_ridge_matches_sklearn(fit_intercept, k, n_shards):
    X, y = _regression_data(k=k, seed=1)
    ref = Ridge(alpha=3.0, fit_intercept=fit_intercept).fit(X, y)
    coef, intercept = _stats_in_shards(X, y, n_shards).solve(3.0, fit_intercept=fit_intercept)
    assert coef.shape == ref.coef_.shape
    assert _rel_diff(coef, ref.coef_) < 1e-5
    assert np.allclose(intercept, ref.intercept_, rtol=1e-5, atol=1e-8)
    # Shape follows y ([k] zeros without intercept, where sklearn gives a scalar 0.0).
    assert np.shape(intercept) == (() if k is None else (k,))


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("k", [None, 2])
def test_merge_of_two_halves_matches_sklearn(fit_intercept, k):
    X, y = _regression_data(k=k, seed=2)
    a = RidgeSufficientStats().update(X[:250], y[:250])
    b = RidgeSufficientStats().update(X[250:], y[250:])
    ref = Ridge(alpha=0.7, fit_intercept=fit_intercept).fit(X, y)
    for merged in (a + b, b + a):
        coef, intercept = merged.solve(0.7, fit_intercept=fit_intercept)
        assert _rel_diff(coef, ref.coef_) < 1e-5
        assert np.allclose(intercept, ref.intercept_, rtol=1e-5, atol=1e-8)
    # __add__ must not mutate its operands.
    assert a.n_samples == 250 and b.n_samples == len(X) - 250
    a += b
    assert a.n_samples == len(X)


def test_large_feature_offset_keeps_precision():
    # |mean| / std ~ 1e3: raw float64 sums must still centre accurately.
    X, y = _regression_data(seed=3, offset=0.0)
    X = X + 1e3 * np.abs(X).max()
    ref = Ridge(alpha=1.0).fit(X, y)
    coef, intercept = _stats_in_shards(X, y, 5).solve(1.0)
    assert _rel_diff(coef, ref.coef_) < 1e-5
    assert abs(intercept - ref.intercept_) / abs(ref.intercept_) < 1e-5


def test_per_target_alpha_and_standardize_match_sklearn():
    X, y = _regression_data(k=2, seed=4)
    stats = RidgeSufficientStats().update(X, y)
    coef, intercept = stats.solve(np.array([0.1, 50.0]))
    for j, alpha in enumerate([0.1, 50.0]):
        ref = Ridge(alpha=alpha).fit(X, y[:, j])
        assert _rel_diff(coef[j], ref.coef_) < 1e-5
        assert abs(intercept[j] - ref.intercept_) < 1e-6 * (1 + abs(ref.intercept_))
    # standardize=True == StandardScaler -> Ridge, mapped back to original units.
    pipe = make_pipeline(StandardScaler(), Ridge(alpha=5.0)).fit(X, y[:, 0])
    ref_coef = pipe[-1].coef_ / pipe[0].scale_
    stats1 = RidgeSufficientStats().update(X, y[:, 0])
    coef_s, intercept_s = stats1.solve(5.0, standardize=True)
    assert _rel_diff(coef_s, ref_coef) < 1e-5
    assert np.allclose(X[:50] @ coef_s + intercept_s, pipe.predict(X[:50]), rtol=1e-6)


def test_torch_shards_equal_numpy_shards():
    X, y = _regression_data(k=2, seed=5)
    s_np = RidgeSufficientStats().update(X, y)
    s_t = RidgeSufficientStats()
    s_t.update(torch.from_numpy(X[:300]).float(), torch.from_numpy(y[:300]))
    s_t.update(torch.from_numpy(X[300:]).double(), y[300:])  # mixed torch X / numpy y
    # float32 shard -> float32 rounding of the inputs only; sums are float64.
    s_ref = RidgeSufficientStats().update(X[:300].astype(np.float32), y[:300]).update(X[300:], y[300:])
    for key in SUM_KEYS[1:]:
        assert np.allclose(getattr(s_t, key), getattr(s_ref, key), rtol=1e-12)
        assert np.allclose(getattr(s_t, key), getattr(s_np, key), rtol=1e-5)
    assert s_t.xtx.dtype == np.float64


def test_arrays_roundtrip_sum_and_npz(tmp_path):
    X, y = _regression_data(k=None, seed=6)
    a = RidgeSufficientStats().update(X[:100], y[:100])
    b = RidgeSufficientStats().update(X[100:], y[100:])
    # What an all-reduce (SUM) over two ranks produces:
    summed = {key: a.to_arrays()[key] + b.to_arrays()[key] for key in SUM_KEYS}
    total = RidgeSufficientStats.from_arrays(summed)
    direct = RidgeSufficientStats().update(X, y)
    assert total.n_samples == len(X) and total.targets_1d
    np.testing.assert_allclose(total.solve(2.0)[0], direct.solve(2.0)[0], rtol=1e-10)
    path = tmp_path / "stats.npz"
    total.save(path)
    loaded = RidgeSufficientStats.load(path)
    assert loaded.n_samples == total.n_samples and loaded.targets_1d
    np.testing.assert_array_equal(loaded.xtx, total.xtx)
    # to_arrays returns copies: mutating them must not change the stats.
    arrays = loaded.to_arrays()
    arrays["xtx"][:] = 0
    assert loaded.xtx.any()


def test_stats_reject_bad_input():
    stats = RidgeSufficientStats().update(np.ones((4, 3)), np.ones(4))
    with pytest.raises(ValueError, match="received 2 features, expected 3"):
        stats.update(np.ones((4, 2)), np.ones(4))
    with pytest.raises(ValueError, match="2-D"):
        stats.update(np.ones((4, 3)), np.ones((4, 1)))
    X = np.ones((4, 3))
    X[1, 2] = np.nan
    with pytest.raises(ValueError, match="1 NaN/inf"):
        RidgeSufficientStats().update(X, np.ones(4))
    with pytest.raises(ValueError, match="same number of rows"):
        RidgeSufficientStats().update(np.ones((4, 3)), np.ones(5))
    with pytest.raises(ValueError, match="n_samples=0"):
        RidgeSufficientStats(3, 1).solve(1.0)
    with pytest.raises(ValueError, match="missing key"):
        RidgeSufficientStats.from_arrays({"n_samples": np.array(3.0)})


# ----------------------------------------------------------------------- GCV


def _brute_force_gcv(X, y, alpha, fit_intercept=True):
    """GCV from the explicit n x n hat matrix."""
    n, d = X.shape
    Z = np.column_stack([X, np.ones(n)]) if fit_intercept else X
    penalty = np.eye(Z.shape[1]) * alpha
    if fit_intercept:
        penalty[-1, -1] = 0.0  # intercept not penalised
    H = Z @ np.linalg.solve(Z.T @ Z + penalty, Z.T)
    rss = np.sum((y - H @ y) ** 2)
    return n * rss / (n - np.trace(H)) ** 2


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_gcv_scores_match_explicit_hat_matrix(fit_intercept):
    X, y = _regression_data(n=60, d=8, seed=7, noise=2.0)
    res = RidgeSufficientStats().update(X, y).solve_gcv(fit_intercept=fit_intercept)
    expected = [_brute_force_gcv(X, y, a, fit_intercept) for a in res.alphas]
    np.testing.assert_allclose(res.gcv_scores, expected, rtol=1e-7)
    best = int(np.argmin(expected))
    assert res.alpha == res.alphas[best]
    ref = Ridge(alpha=res.alpha, fit_intercept=fit_intercept).fit(X, y)
    assert _rel_diff(res.coef, ref.coef_) < 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_gcv_picks_same_alpha_as_ridgecv(seed):
    # For n >> d leverages are near-uniform and GCV ~= sklearn's exact LOO.
    rng = np.random.default_rng(seed)
    n, d = 2000, 20
    X = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, d) + rng.normal(size=d)
    y = X @ (0.05 * rng.normal(size=d)) + 3 * rng.normal(size=n)
    stats = _stats_in_shards(X, y, 4)
    res = stats.solve_gcv()
    ridge_cv = RidgeCV(alphas=res.alphas).fit(X, y)
    # Interior optimum, otherwise "same alpha" would be a trivial grid-edge match.
    assert 0 < np.flatnonzero(res.alphas == res.alpha)[0] < len(res.alphas) - 1
    assert res.alpha == ridge_cv.alpha_
    assert _rel_diff(res.coef, ridge_cv.coef_) < 1e-5
    probe = RidgeProbe(alpha="auto").fit(X, y)
    # Its grid comes from one shard's sums, so it may differ from res.alphas in the last ulp.
    assert probe.alpha_ == pytest.approx(ridge_cv.alpha_, rel=1e-12)
    assert _rel_diff(probe.coef_, ridge_cv.coef_) < 1e-5


def test_gcv_alpha_grows_with_noise_and_is_per_target():
    rng = np.random.default_rng(8)
    n, d = 400, 30
    X = rng.normal(size=(n, d))
    w = rng.normal(size=d) * 0.3
    Y = np.column_stack([X @ w + 0.1 * rng.normal(size=n), X @ w + 10 * rng.normal(size=n)])
    res = RidgeSufficientStats().update(X, Y).solve_gcv()
    assert res.alpha.shape == (2,) and res.alpha[0] < res.alpha[1]
    for j in range(2):
        single = RidgeSufficientStats().update(X, Y[:, j]).solve_gcv()
        assert single.alpha == res.alpha[j]
        np.testing.assert_allclose(res.coef[j], single.coef, rtol=1e-10)
        np.testing.assert_allclose(res.coef[j], RidgeSufficientStats().update(X, Y[:, j]).solve(
            single.alpha)[0], rtol=1e-8)


def test_default_grid_is_relative_to_feature_variance():
    X, y = _regression_data(seed=9)
    stats = RidgeSufficientStats().update(X, y)
    # Standardised features have unit variance -> the grid is exactly the relative one.
    np.testing.assert_allclose(stats.alpha_grid(standardize=True), DEFAULT_RELATIVE_ALPHAS, rtol=1e-10)
    scaled = RidgeSufficientStats().update(10 * X, y)
    np.testing.assert_allclose(scaled.alpha_grid(), 100 * stats.alpha_grid(), rtol=1e-10)
    assert len(DEFAULT_RELATIVE_ALPHAS) == 40


# ------------------------------------------------------------- RidgeProbe


def test_ridge_probe_fit_and_fit_stats_agree():
    X, y = _regression_data(k=2, seed=10)
    probe = RidgeProbe(alpha=2.0).fit(X, y)
    ref = Ridge(alpha=2.0).fit(X, y)
    assert _rel_diff(probe.coef_, ref.coef_) < 1e-5
    np.testing.assert_allclose(probe.predict(X), ref.predict(X), rtol=1e-6)
    from_stats = RidgeProbe(alpha=2.0).fit_stats(_stats_in_shards(X, y, 3))
    np.testing.assert_allclose(from_stats.coef_, probe.coef_, rtol=1e-9)
    assert from_stats.n_features_in_ == X.shape[1]
    with pytest.raises(ValueError, match="alpha must be a float >= 0 or 'auto'; received 'best'"):
        RidgeProbe(alpha="best").fit(X, y)
    with pytest.raises(ValueError, match="received -1"):
        RidgeProbe(alpha=-1).fit(X, y)


# ---------------------------------------------------- Logistic / Pairwise


def test_logistic_probe_matches_sklearn():
    rng = np.random.default_rng(11)
    X = rng.normal(size=(300, 6)) * [1, 2, 3, 0.5, 10, 1] + 5
    logits = (X - 5) @ rng.normal(size=6)
    y = (logits + rng.logistic(size=300) > 0).astype(int)
    probe = LogisticProbe(C=0.5).fit(X, y)
    ref = LogisticRegression(C=0.5, max_iter=10000, tol=1e-10).fit(X, y)
    np.testing.assert_allclose(probe.predict_proba(X), ref.predict_proba(X), atol=1e-4)
    assert probe.coef_.shape == (1, 6)
    # standardize=True == StandardScaler -> LogisticRegression.
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, tol=1e-10)).fit(X, y)
    probe_s = LogisticProbe(C=0.5, standardize=True).fit(X, y)
    np.testing.assert_allclose(probe_s.predict_proba(X), pipe.predict_proba(X), atol=1e-4)
    # Multiclass: softmax over K scores.
    y3 = np.digitize(logits, np.quantile(logits, [1 / 3, 2 / 3]))
    p3 = LogisticProbe().fit(X, y3).predict_proba(X)
    assert p3.shape == (300, 3) and np.allclose(p3.sum(1), 1.0)


def _bradley_terry_pairs(n_items=200, d=10, n_pairs=3000, seed=12):
    rng = np.random.default_rng(seed)
    items = rng.normal(size=(n_items, d))
    w = rng.normal(size=d)
    a, b = rng.integers(0, n_items, n_pairs), rng.integers(0, n_items, n_pairs)
    D = pairwise_differences(items[a], items[b])
    y = (rng.random(n_pairs) < 1 / (1 + np.exp(-D @ w))).astype(int)
    return items, w, D, y


def test_pairwise_probe_recovers_bradley_terry_reward():
    items, w, D, y = _bradley_terry_pairs()
    probe = PairwiseProbe(C=10.0).fit(D, y)
    cosine = probe.coef_ @ w / np.linalg.norm(probe.coef_) / np.linalg.norm(w)
    assert cosine > 0.95
    assert probe.intercept_ == 0.0 and probe.coef_.shape == (10,)
    # Antisymmetry: swapping a and b flips the preference probability.
    p = probe.predict_proba(D)[:, 1]
    np.testing.assert_allclose(probe.predict_proba(-D)[:, 1], 1 - p, atol=1e-12)
    # Item rewards explain pair scores: r(a) - r(b) == decision_function(x_a - x_b).
    rewards = probe.score_items(items)
    assert spearman(items @ w, rewards) > 0.95
    np.testing.assert_allclose(
        rewards[:5] - rewards[5:10], probe.decision_function(items[:5] - items[5:10]), atol=1e-10
    )
    same = PairwiseProbe.pairwise_differences(torch.from_numpy(items[:5]), items[5:10])
    np.testing.assert_allclose(same, items[:5] - items[5:10])


def test_pairwise_probe_rejects_non_binary_and_shape_mismatch():
    _, _, D, y = _bradley_terry_pairs(n_pairs=300)
    with pytest.raises(ValueError, match="Only binary classification is supported"):
        PairwiseProbe().fit(D, y + (np.arange(300) % 3 == 0))
    with pytest.raises(ValueError, match=r"received \(3, 2\) and \(3, 4\)"):
        pairwise_differences(np.ones((3, 2)), np.ones((3, 4)))


# ------------------------------------------------------------------ metrics


def test_count_inversions_matches_brute_force():
    rng = np.random.default_rng(13)
    for n in [0, 1, 2, 3, 17, 64, 101]:
        a = rng.integers(0, max(n // 3, 1), n)
        i, j = np.triu_indices(n, 1)
        assert _count_inversions(a) == int((a[i] > a[j]).sum())


@pytest.mark.parametrize("seed", range(4))
def test_rank_metrics_match_scipy_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = 400
    y_true = np.round(rng.normal(size=n), 1)  # rounding creates ties
    y_pred = np.round(y_true + rng.normal(size=n), 1)
    assert kendall_tau(y_true, y_pred) == pytest.approx(
        scipy.stats.kendalltau(y_true, y_pred).statistic, abs=1e-12
    )
    assert spearman(y_true, y_pred) == pytest.approx(
        scipy.stats.spearmanr(y_true, y_pred).statistic, abs=1e-12
    )
    labels = y_true > 0.3
    assert roc_auc(labels, y_pred) == pytest.approx(roc_auc_score(labels, y_pred), abs=1e-12)
    i, j = np.triu_indices(n, 1)
    agree = np.sign(y_true[i] - y_true[j]) * np.sign(y_pred[i] - y_pred[j])
    assert pairwise_accuracy(y_true, y_pred) == pytest.approx(
        (agree > 0).sum() / (agree != 0).sum(), abs=1e-12
    )


def test_simple_metric_values():
    assert top_k_overlap([5, 4, 3, 2, 1], [4, 5, 1, 3, 2], k=2) == 1.0
    assert top_k_overlap([5, 4, 3, 2, 1], [1, 2, 3, 4, 5], k=2) == 0.0
    assert top_k_overlap([5, 4, 3, 2, 1], [5, 1, 0, 4, 0], k=3) == pytest.approx(2 / 3)
    assert sign_agreement([1.0, -2.0, 3.0, 0.0], [0.5, 1.0, 2.0, 7.0]) == pytest.approx(2 / 3)
    assert pairwise_accuracy([1, 2, 3], [1, 3, 2]) == pytest.approx(2 / 3)
    assert np.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))  # undefined for constant input
    assert np.isnan(roc_auc([1, 1, 1], [0.2, 0.5, 0.1]))
    with pytest.raises(ValueError, match="binary; received 3 distinct"):
        roc_auc([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, n=3\]; received 4"):
        top_k_overlap([1, 2, 3], [1, 2, 3], k=4)


def test_pairwise_accuracy_is_fast_at_10k():
    rng = np.random.default_rng(14)
    y = rng.normal(size=10_000)
    start = time.perf_counter()
    value = pairwise_accuracy(y, y + rng.normal(size=10_000))
    assert time.perf_counter() - start < 0.5
    assert 0.6 < value < 0.9


def test_metrics_reject_nan_empty_and_mismatch():
    y = np.arange(6.0)
    bad = y.copy()
    bad[[1, 4]] = np.nan
    for fn in (kendall_tau, spearman, pairwise_accuracy, roc_auc, sign_agreement):
        with pytest.raises(ValueError, match=r"y_pred contains 2 NaN value\(s\) out of 6 \(at indices \[1, 4\]"):
            fn(y > 2, bad)
        with pytest.raises(ValueError, match="empty"):
            fn([], [])
        with pytest.raises(ValueError, match="same length; received 6 and 5"):
            fn(y, y[:5])
    with pytest.raises(ValueError, match="y_true contains 2 NaN"):
        bootstrap_ci(spearman, bad, y)
    with pytest.raises(ValueError, match="empty"):
        evaluate_all([], [])


def test_bootstrap_ci_contains_estimate_and_narrows_with_n():
    rng = np.random.default_rng(15)
    widths = []
    for n in (100, 2000):
        y_true = rng.normal(size=n)
        y_pred = y_true + rng.normal(size=n)
        res = bootstrap_ci(spearman, y_true, y_pred, n_boot=300, seed=0)
        assert res.low < res.value < res.high and res.n == n
        assert res.value == pytest.approx(spearman(y_true, y_pred))
        widths.append(res.high - res.low)
    # Width shrinks like 1/sqrt(n): 20x the data -> ~4.5x narrower.
    assert widths[1] < widths[0] / 3
    again = bootstrap_ci(spearman, y_true, y_pred, n_boot=300, seed=0)
    assert again == res  # same seed, same resamples
    assert res.to_dict() == {"value": res.value, "low": res.low, "high": res.high, "n": 2000}
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.value = 0.0


@pytest.mark.parametrize("metric", [kendall_tau, pairwise_accuracy, sign_agreement, spearman])
@pytest.mark.parametrize("n", [4, 60, 301])
def test_vectorised_bootstrap_equals_the_resampling_loop(metric, n):
    """bootstrap_ci evaluates these metrics on all resamples at once; the loop over resamples (the
    generic path, used for any other metric) must give bit-for-bit the same resamples and intervals."""
    rng = np.random.default_rng(n)
    y_true = np.round(rng.normal(size=n), 1)  # ties in both vectors
    y_pred = np.round(y_true + rng.normal(size=n), 1)
    y_pred[: n // 4] = 0.0

    def loop(a, b):  # the same metric, hidden from the fast path
        return metric(a, b)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # tiny n: some resamples are undefined
        fast = bootstrap_ci(metric, y_true, y_pred, n_boot=400, seed=7)
        slow = bootstrap_ci(loop, y_true, y_pred, n_boot=400, seed=7)
    assert fast.value == slow.value
    assert fast.low == pytest.approx(slow.low, abs=1e-12) and fast.high == pytest.approx(slow.high, abs=1e-12)


def test_bootstrap_warns_about_undefined_resamples():
    y_true = np.array([0] * 19 + [1])
    with pytest.warns(RuntimeWarning, match=r"undefined \(nan\) on \d+ of 200 resamples"):
        res = bootstrap_ci(roc_auc, y_true, np.linspace(0, 1, 20), n_boot=200)
    assert res.value == 1.0 and res.low <= res.high


def test_evaluate_all_outputs():
    rng = np.random.default_rng(16)
    y_true = rng.normal(size=200)
    y_pred = y_true + rng.normal(size=200)
    out = evaluate_all(y_true, y_pred, n_boot=50)
    assert set(out) == {"kendall_tau", "spearman", "pairwise_accuracy", "top_k_overlap", "sign_agreement"}
    assert all(isinstance(r, MetricResult) and r.low <= r.value <= r.high for r in out.values())
    assert out["top_k_overlap"].value == top_k_overlap(y_true, y_pred, k=20)
    binary = evaluate_all(y_true > 0, y_pred, n_boot=0, metrics=["roc_auc", "spearman"])
    assert set(binary) == {"roc_auc", "spearman"} and np.isnan(binary["roc_auc"].low)
    assert binary["roc_auc"].value == pytest.approx(roc_auc_score(y_true > 0, y_pred))
    assert "roc_auc" in evaluate_all((y_true > 0).astype(float), y_pred, n_boot=0)
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate_all(y_true, y_pred, metrics=["r2"])
    top = partial(top_k_overlap, k=5)
    assert bootstrap_ci(top, y_true, y_pred, n_boot=20).n == 200
