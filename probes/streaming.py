"""Exact streaming ridge regression from sufficient statistics.

Ridge regression only needs the first and second moments of ``[X, y]``; these
are sums over samples, so they can be accumulated shard by shard, merged across
processes (a ``torch.distributed`` all-reduce with ``SUM`` over
:meth:`RidgeSufficientStats.to_arrays`), saved, and solved later for any
``alpha`` without touching the data again.

Example::

    stats = RidgeSufficientStats().update(X[:5000], y[:5000]).update(X[5000:], y[5000:])
    coef, intercept = stats.solve(alpha=1.0)      # == sklearn Ridge(alpha=1.0)
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg

from ._utils import is_torch_tensor, to_numpy

__all__ = ["DEFAULT_RELATIVE_ALPHAS", "GCVResult", "RidgeSufficientStats", "SUM_KEYS"]

#: Keys of :meth:`RidgeSufficientStats.to_arrays`. Every one of them is a plain sum
#: over samples, so summing the arrays of two shards gives the stats of their union.
SUM_KEYS: tuple[str, ...] = ("n_samples", "sum_x", "sum_y", "xtx", "xty", "yty")

#: Default GCV grid, *relative* to the mean feature variance (see
#: :meth:`RidgeSufficientStats.alpha_grid`). For standardised features the grid
#: is exactly ``logspace(-3, 6, 40)``.
DEFAULT_RELATIVE_ALPHAS: np.ndarray = np.logspace(-3, 6, 40)

_FORMAT_VERSION = 1


@dataclass(frozen=True)
class GCVResult:
    """Outcome of :meth:`RidgeSufficientStats.solve_gcv`.

    Attributes
    ----------
    alpha : float or ndarray of shape [k]
        Chosen ridge penalty, one per target (a float for 1-D targets).
    coef : ndarray of shape [d] (1-D targets) or [k, d]
    intercept : float or ndarray of shape [k]
    alphas : ndarray of shape [m]
        The absolute grid that was searched.
    gcv_scores : ndarray of shape [m] (1-D targets) or [m, k]
        GCV criterion ``n * RSS / (n - df)**2`` per alpha (lower is better).
    df : ndarray of shape [m]
        Effective degrees of freedom ``trace(H)`` per alpha, intercept included.
    """

    alpha: float | np.ndarray
    coef: np.ndarray
    intercept: float | np.ndarray
    alphas: np.ndarray
    gcv_scores: np.ndarray
    df: np.ndarray


class RidgeSufficientStats:
    """Float64 sufficient statistics of ``(X, y)`` for exact (streaming) ridge.

    Holds ``n``, ``sum_x`` [d], ``sum_y`` [k], ``xtx`` = XᵀX [d, d], ``xty`` =
    Xᵀy [d, k] and ``yty`` = yᵀy [k, k], all as raw (uncentred) float64 sums, so
    that stats from shards or processes combine by plain addition.

    Parameters
    ----------
    n_features, n_targets : int, optional
        Expected shapes; inferred from the first :meth:`update` when omitted.

    Notes
    -----
    Centring happens at solve time (``XᵀX - n·μμᵀ``). With raw float64 sums the
    relative error of the centred Gram is about ``1e-16 * mean² / variance`` per
    feature, i.e. negligible unless ``|mean| / std`` exceeds ~1e5; subtract a
    rough mean yourself in that case (and add it back to the intercept).
    Memory is ``8 * (d² + d·k + k²)`` bytes: 27 MB for d = 1 800, 72 MB for
    d = 3 000.

    Example::

        stats = RidgeSufficientStats().update(X, y)          # X [n, d], y [n]
        res = stats.solve_gcv()                             # res.alpha, res.coef
    """

    def __init__(self, n_features: int | None = None, n_targets: int | None = None):
        self.n_features = n_features
        self.n_targets = n_targets
        # None until the first update tells us whether y was [n] or [n, k].
        self.targets_1d: bool | None = None
        self.n_samples = 0
        self.sum_x: np.ndarray | None = None
        self.sum_y: np.ndarray | None = None
        self.xtx: np.ndarray | None = None
        self.xty: np.ndarray | None = None
        self.yty: np.ndarray | None = None
        if n_features is not None and n_targets is not None:
            self._allocate(n_features, n_targets)

    # ------------------------------------------------------------------ state
    def _allocate(self, d: int, k: int) -> None:
        self.n_features, self.n_targets = int(d), int(k)
        self.sum_x = np.zeros(d)
        self.sum_y = np.zeros(k)
        self.xtx = np.zeros((d, d))
        self.xty = np.zeros((d, k))
        self.yty = np.zeros((k, k))

    @property
    def is_empty(self) -> bool:
        """True when no samples have been accumulated."""
        return self.n_samples == 0

    @property
    def mean_x(self) -> np.ndarray:
        """Feature means, shape [d]."""
        self._require_samples("mean_x")
        return self.sum_x / self.n_samples

    @property
    def mean_y(self) -> np.ndarray:
        """Target means, shape [k]."""
        self._require_samples("mean_y")
        return self.sum_y / self.n_samples

    def _require_samples(self, what: str, minimum: int = 1) -> None:
        if self.n_samples < minimum:
            raise ValueError(
                f"{what} needs at least {minimum} accumulated sample(s); received "
                f"n_samples={self.n_samples}. Call update(X, y) with more data first."
            )

    def __repr__(self) -> str:
        return (
            f"RidgeSufficientStats(n_samples={self.n_samples}, "
            f"n_features={self.n_features}, n_targets={self.n_targets})"
        )

    # --------------------------------------------------------------- updating
    def update(self, X: Any, y: Any) -> RidgeSufficientStats:
        """Add one shard.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape [n, d]
        y : array-like or torch.Tensor of shape [n] or [n, k]

        Torch tensors are reduced on their own device in float64 and only the
        small [d, d] results are copied to the host. An empty shard (n = 0) is
        allowed so that every rank can call ``update`` unconditionally.

        Returns
        -------
        self
        """
        if is_torch_tensor(X):
            n, y_ndim, parts = self._shard_sums_torch(X, y)
        else:
            n, y_ndim, parts = self._shard_sums_numpy(X, y)
        d, k = parts[0].shape[0], parts[1].shape[0]
        self._check_compatible(d, k, y_ndim == 1, source="update")
        if self.sum_x is None:
            self._allocate(d, k)
        if self.targets_1d is None:
            self.targets_1d = y_ndim == 1
        self.n_samples += n
        for name, part in zip(SUM_KEYS[1:], parts):
            getattr(self, name).__iadd__(part)
        return self

    def _check_compatible(self, d: int, k: int, targets_1d: bool | None, source: str):
        if self.n_features is not None and d != self.n_features:
            raise ValueError(
                f"{source}: received {d} features, expected {self.n_features} "
                "(the number these stats were created with or first updated with)."
            )
        if self.n_targets is not None and k != self.n_targets:
            raise ValueError(
                f"{source}: received {k} target(s), expected {self.n_targets}."
            )
        if (
            self.targets_1d is not None
            and targets_1d is not None
            and targets_1d != self.targets_1d
        ):
            have = "1-D [n]" if self.targets_1d else "2-D [n, k]"
            got = "1-D [n]" if targets_1d else "2-D [n, k]"
            raise ValueError(
                f"{source}: received {got} targets, but earlier shards had {have} "
                "targets; use one shape throughout so solve() knows which to return."
            )

    @staticmethod
    def _check_shapes(x_shape, y_shape) -> None:
        if len(x_shape) != 2:
            raise ValueError(
                f"X must be 2-D [n_samples, n_features]; received shape {tuple(x_shape)}."
            )
        if len(y_shape) not in (1, 2):
            raise ValueError(
                f"y must be [n_samples] or [n_samples, n_targets]; "
                f"received shape {tuple(y_shape)}."
            )
        if x_shape[0] != y_shape[0]:
            raise ValueError(
                f"X and y must have the same number of rows; received "
                f"X {tuple(x_shape)} and y {tuple(y_shape)}."
            )

    def _shard_sums_numpy(self, X, y):
        X = to_numpy(X, name="X")
        y = to_numpy(y, name="y")
        self._check_shapes(X.shape, y.shape)
        y_ndim = y.ndim
        y2 = y.reshape(len(y), -1)
        # One non-finite value would silently poison every later solve.
        for arr, name in ((X, "X"), (y2, "y")):
            if not np.isfinite(arr).all():
                bad = int((~np.isfinite(arr)).sum())
                raise ValueError(
                    f"{name} contains {bad} NaN/inf value(s); expected finite values."
                )
        # ``X.T @ X`` is dispatched to BLAS syrk (half the flops of a general gemm).
        parts = (X.sum(0), y2.sum(0), X.T @ X, X.T @ y2, y2.T @ y2)
        return X.shape[0], y_ndim, parts

    def _shard_sums_torch(self, X, y):
        import torch

        yt = y.detach() if is_torch_tensor(y) else torch.as_tensor(to_numpy(y, name="y"))
        self._check_shapes(tuple(X.shape), tuple(yt.shape))
        # Reduce on X's device (e.g. the GPU holding the activations) in float64.
        Xt = X.detach().to(torch.float64)
        yt = yt.to(device=Xt.device, dtype=torch.float64)
        y_ndim = yt.ndim
        y2 = yt.reshape(yt.shape[0], -1)
        for arr, name in ((Xt, "X"), (y2, "y")):
            finite = torch.isfinite(arr)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise ValueError(
                    f"{name} contains {bad} NaN/inf value(s); expected finite values."
                )
        parts = (Xt.sum(0), y2.sum(0), Xt.T @ Xt, Xt.T @ y2, y2.T @ y2)
        return Xt.shape[0], y_ndim, tuple(p.cpu().numpy() for p in parts)

    # ---------------------------------------------------------------- merging
    def merge(self, other: RidgeSufficientStats) -> RidgeSufficientStats:
        """Add ``other``'s statistics into ``self`` in place; returns ``self``."""
        if not isinstance(other, RidgeSufficientStats):
            raise TypeError(
                f"merge expects a RidgeSufficientStats; received {type(other).__name__}."
            )
        if other.sum_x is None:
            return self
        self._check_compatible(
            other.n_features, other.n_targets, other.targets_1d, source="merge"
        )
        if self.sum_x is None:
            self._allocate(other.n_features, other.n_targets)
        if self.targets_1d is None:
            self.targets_1d = other.targets_1d
        self.n_samples += other.n_samples
        for name in SUM_KEYS[1:]:
            getattr(self, name).__iadd__(getattr(other, name))
        return self

    def __add__(self, other: RidgeSufficientStats) -> RidgeSufficientStats:
        if not isinstance(other, RidgeSufficientStats):
            return NotImplemented
        return copy.deepcopy(self).merge(other)

    def __iadd__(self, other: RidgeSufficientStats) -> RidgeSufficientStats:
        if not isinstance(other, RidgeSufficientStats):
            return NotImplemented
        return self.merge(other)

    # ---------------------------------------------------------- serialisation
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Copies of the additive statistics as a flat dict (keys: ``SUM_KEYS``).

        Every entry is a sum over samples, so an element-wise SUM all-reduce of
        these arrays across ranks yields the stats of all ranks' data::

            arrays = {k: torch.from_numpy(v) for k, v in stats.to_arrays().items()}
            for t in arrays.values(): dist.all_reduce(t)            # op=SUM
            total = RidgeSufficientStats.from_arrays({k: t.numpy() for k, t in arrays.items()})

        ``n_samples`` is a 0-d float64 array (exact up to 2**53 samples).
        """
        if self.sum_x is None:
            raise ValueError(
                "to_arrays needs known shapes; create the stats with n_features "
                "and n_targets or call update() first."
            )
        out = {"n_samples": np.array(float(self.n_samples))}
        out.update({name: getattr(self, name).copy() for name in SUM_KEYS[1:]})
        return out

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, Any], *, targets_1d: bool | None = None
    ) -> RidgeSufficientStats:
        """Rebuild stats from :meth:`to_arrays` output (numpy or torch values).

        ``targets_1d`` says whether :meth:`solve` should return 1-D coefficients;
        by default it is True when there is a single target.
        """
        missing = [key for key in SUM_KEYS if key not in arrays]
        if missing:
            raise ValueError(
                f"from_arrays: missing key(s) {missing}; expected keys {list(SUM_KEYS)}, "
                f"received {sorted(arrays)}."
            )
        vals = {key: to_numpy(arrays[key], name=key) for key in SUM_KEYS}
        d, k = vals["sum_x"].shape[0], vals["sum_y"].shape[0]
        expected = {"n_samples": (), "sum_x": (d,), "sum_y": (k,), "xtx": (d, d),
                    "xty": (d, k), "yty": (k, k)}
        for key, shape in expected.items():
            if vals[key].shape != shape:
                raise ValueError(
                    f"from_arrays: {key} has shape {vals[key].shape}, expected {shape} "
                    f"(from sum_x [d={d}] and sum_y [k={k}])."
                )
        n = float(vals["n_samples"])
        if n < 0 or n != round(n):
            raise ValueError(f"from_arrays: n_samples must be a count; received {n}.")
        stats = cls(d, k)
        stats.n_samples = int(round(n))
        stats.targets_1d = (k == 1) if targets_1d is None else bool(targets_1d)
        for key in SUM_KEYS[1:]:
            getattr(stats, key)[...] = vals[key]
        return stats

    def save(self, path: str | os.PathLike) -> None:
        """Write the stats to an uncompressed ``.npz`` file."""
        np.savez(
            path,
            **self.to_arrays(),
            targets_1d=np.array(bool(self.targets_1d)),
            format_version=np.array(_FORMAT_VERSION),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> RidgeSufficientStats:
        """Read stats written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as data:
            version = int(data["format_version"]) if "format_version" in data else None
            if version != _FORMAT_VERSION:
                raise ValueError(
                    f"{path}: format_version {version}, expected {_FORMAT_VERSION}; "
                    "was it written by RidgeSufficientStats.save?"
                )
            arrays = {key: data[key] for key in SUM_KEYS}
            return cls.from_arrays(arrays, targets_1d=bool(data["targets_1d"]))

    # ---------------------------------------------------------------- solving
    def _system(self, fit_intercept: bool, standardize: bool):
        """Normal equations ``G w = B`` in (optionally) centred, scaled coordinates.

        Returns G [d, d], B [d, k], yy [k] (the target sum of squares in the
        same coordinates), x_mean [d], y_mean [k] and scale [d].
        """
        self._require_samples("solving")
        n = self.n_samples
        x_mean, y_mean = self.mean_x, self.mean_y
        # Centred Gram; needed for standardisation even without an intercept.
        Gc = self.xtx - n * np.outer(x_mean, x_mean)
        if fit_intercept:
            G = Gc
            B = self.xty - n * np.outer(x_mean, y_mean)
            yy = np.diag(self.yty) - n * y_mean**2
        else:
            G = self.xtx.copy()
            B = self.xty.copy()
            yy = np.diag(self.yty).copy()
            x_mean = np.zeros_like(x_mean)
            y_mean = np.zeros_like(y_mean)
        # Round-off makes the subtraction slightly asymmetric; eigh/cholesky want symmetry.
        G = (G + G.T) / 2
        scale = np.ones(self.n_features)
        if standardize:
            var = np.clip(np.diag(Gc) / n, 0.0, None)
            scale = np.sqrt(var)
            # Constant features (or ones whose variance is round-off from the raw
            # sums) keep scale 1, as sklearn's StandardScaler does for zero variance.
            tiny = (scale == 0) | (scale < 1e-6 * np.abs(self.mean_x))
            scale[tiny] = 1.0
            G = G / np.outer(scale, scale)
            B = B / scale[:, None]
        return G, B, np.clip(yy, 0.0, None), x_mean, y_mean, scale

    def _package(self, W, scale, x_mean, y_mean, fit_intercept):
        """Map standardised-space weights W [d, k] back to (coef, intercept)."""
        W = W / scale[:, None]
        if fit_intercept:
            intercept = y_mean - x_mean @ W
        else:
            intercept = np.zeros(self.n_targets)
        coef = W.T
        if self.targets_1d:
            return coef[0].copy(), float(intercept[0])
        return np.ascontiguousarray(coef), intercept

    def _per_target_alpha(self, alpha, name: str = "alpha") -> np.ndarray:
        alpha = np.asarray(alpha, dtype=np.float64)
        if alpha.ndim == 0:
            alpha = np.full(self.n_targets, float(alpha))
        if alpha.shape != (self.n_targets,):
            raise ValueError(
                f"{name} must be a scalar or have one value per target "
                f"(shape ({self.n_targets},)); received shape {alpha.shape}."
            )
        if not np.all(np.isfinite(alpha)) or np.any(alpha < 0):
            raise ValueError(f"{name} must be finite and >= 0; received {alpha}.")
        return alpha

    def solve(
        self,
        alpha: float | np.ndarray = 1.0,
        *,
        fit_intercept: bool = True,
        standardize: bool = False,
    ) -> tuple[np.ndarray, float | np.ndarray]:
        """Ridge solution ``argmin ||y - Xw - b||² + alpha ||w||²``.

        Equals ``sklearn.linear_model.Ridge(alpha, fit_intercept=...)`` on the
        accumulated data (the intercept is not penalised). With
        ``standardize=True`` the penalty applies to coefficients of features
        scaled to unit variance; the returned coefficients are in original units.

        Parameters
        ----------
        alpha : float or array of shape [k]
            Penalty, shared or per target; 0 gives least squares (minimum-norm
            solution if the Gram matrix is singular).

        Returns
        -------
        coef : ndarray of shape [d] (1-D targets) or [k, d]
        intercept : float (1-D targets) or ndarray of shape [k]
        """
        alpha = self._per_target_alpha(alpha)
        G, B, _, x_mean, y_mean, scale = self._system(fit_intercept, standardize)
        W = np.empty_like(B)
        for a in np.unique(alpha):
            cols = alpha == a
            W[:, cols] = _solve_ridge_system(G, B[:, cols], a)
        return self._package(W, scale, x_mean, y_mean, fit_intercept)

    def alpha_grid(
        self,
        relative: np.ndarray | None = None,
        *,
        fit_intercept: bool = True,
        standardize: bool = False,
    ) -> np.ndarray:
        """Absolute alpha grid = ``relative`` × mean feature variance.

        The mean feature variance is ``trace(G) / (n·d)`` for the (centred,
        optionally standardised) Gram ``G``. Scaling by it makes the grid
        invariant to the units of X, and for standardised features the grid is
        exactly ``relative`` (default ``logspace(-3, 6, 40)``, the usual range
        for unit-variance features). It is deliberately *not* scaled by n (that
        would be the Gram's mean eigenvalue): the optimal ridge penalty is a
        noise-to-prior variance ratio and does not grow with the sample size.
        """
        relative = DEFAULT_RELATIVE_ALPHAS if relative is None else relative
        G, *_ = self._system(fit_intercept, standardize)
        unit = np.trace(G) / (self.n_samples * self.n_features)
        # All-constant features: no natural unit, fall back to the relative grid.
        return np.asarray(relative, dtype=np.float64) * (unit if unit > 0 else 1.0)

    def solve_gcv(
        self,
        alphas: np.ndarray | None = None,
        *,
        fit_intercept: bool = True,
        standardize: bool = False,
    ) -> GCVResult:
        """Choose alpha per target by generalised cross-validation and solve.

        With the eigendecomposition ``G = V diag(s) Vᵀ`` of the centred Gram and
        projected targets ``P = Vᵀ Xᵀy`` everything is closed-form per alpha::

            RSS(α) = yᵀy - Σ_i P_i² (s_i + 2α) / (s_i + α)²
            df(α)  = Σ_i s_i / (s_i + α)  (+1 for the intercept)
            GCV(α) = n · RSS(α) / (n - df(α))²

        One O(d³) eigendecomposition serves the whole grid. Exact leave-one-out
        would need each sample's leverage, which sums over samples cannot
        provide; GCV replaces the leverages by their mean df/n, and agrees with
        LOO (e.g. sklearn's ``RidgeCV``) when leverages are roughly uniform,
        as they are for n ≫ d.

        Parameters
        ----------
        alphas : array of shape [m], optional
            Absolute grid of positive penalties; default :meth:`alpha_grid`.

        Returns
        -------
        GCVResult
        """
        self._require_samples("solve_gcv", minimum=2)
        G, B, yy, x_mean, y_mean, scale = self._system(fit_intercept, standardize)
        if alphas is None:
            alphas = self.alpha_grid(fit_intercept=fit_intercept, standardize=standardize)
        alphas = np.asarray(alphas, dtype=np.float64)
        if alphas.ndim != 1 or alphas.size == 0:
            raise ValueError(
                f"alphas must be a non-empty 1-D array; received shape {alphas.shape}."
            )
        if not np.all(np.isfinite(alphas)) or np.any(alphas <= 0):
            raise ValueError(
                f"alphas must be finite and > 0 for GCV; received {alphas}."
            )
        n = self.n_samples
        s, V = np.linalg.eigh(G)
        s = np.clip(s, 0.0, None)  # tiny negative eigenvalues are round-off
        P = V.T @ B  # [d, k]
        den = s[None, :] + alphas[:, None]  # [m, d]
        rss = yy[None, :] - ((s[None, :] + 2 * alphas[:, None]) / den**2) @ (P**2)
        rss = np.clip(rss, 0.0, None)  # cancellation when the fit is near-perfect
        df = (s[None, :] / den).sum(1) + float(fit_intercept)
        resid_df = n - df
        with np.errstate(divide="ignore", invalid="ignore"):
            gcv = n * rss / resid_df[:, None] ** 2
        # df -> n (tiny alpha with d >= n) means interpolation: GCV is undefined.
        gcv[resid_df <= 1e-9 * n] = np.inf
        if not np.isfinite(gcv).any(axis=0).all():
            raise ValueError(
                f"GCV is undefined for every alpha in the grid (n={n}, "
                f"d={self.n_features}): the fit interpolates the data. "
                "Use larger alphas or more samples."
            )
        best = np.argmin(gcv, axis=0)  # first minimum: the smallest tied alpha
        chosen = alphas[best]  # [k]
        W = V @ (P / (s[:, None] + chosen[None, :]))
        coef, intercept = self._package(W, scale, x_mean, y_mean, fit_intercept)
        if self.targets_1d:
            return GCVResult(float(chosen[0]), coef, intercept, alphas, gcv[:, 0], df)
        return GCVResult(chosen, coef, intercept, alphas, gcv, df)


def _solve_ridge_system(G: np.ndarray, B: np.ndarray, alpha: float) -> np.ndarray:
    """Solve ``(G + alpha I) W = B`` for symmetric PSD ``G``."""
    A = G.copy()
    A.flat[:: A.shape[0] + 1] += alpha
    try:
        return scipy.linalg.solve(A, B, assume_a="pos", check_finite=False)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        # Singular (alpha = 0 with collinear features): minimum-norm solution.
        return scipy.linalg.lstsq(A, B, check_finite=False)[0]
