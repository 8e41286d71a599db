"""Small input-conversion helpers shared by the probes modules (private)."""

from __future__ import annotations

from typing import Any

import numpy as np


def is_torch_tensor(obj: Any) -> bool:
    """True for a ``torch.Tensor`` without importing torch when it is not loaded."""
    # Checking the type's module avoids importing torch (slow) for numpy users.
    return type(obj).__module__.startswith("torch") and hasattr(obj, "detach")


def to_numpy(obj: Any, *, name: str, dtype: Any = np.float64) -> np.ndarray:
    """Convert a numpy array, torch tensor or sequence to a numpy array of ``dtype``.

    Torch tensors are detached and moved to the CPU; other inputs go through
    ``np.asarray``. Raises ``ValueError`` naming ``name`` when conversion fails.
    """
    if is_torch_tensor(obj):
        obj = obj.detach().cpu()
        if dtype is not None:
            # Convert in torch first: numpy cannot read bfloat16 tensors directly.
            import torch

            obj = obj.to(torch.float64)
        obj = obj.numpy()
    try:
        return np.asarray(obj, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{name} could not be converted to a numeric array "
            f"(received {type(obj).__name__}): {exc}"
        ) from exc


def describe_nans(arr: np.ndarray, *, name: str, max_shown: int = 10) -> str | None:
    """Return an error message naming how many NaNs ``arr`` holds and where, or None."""
    mask = np.isnan(arr)
    count = int(mask.sum())
    if count == 0:
        return None
    where = np.argwhere(mask)
    shown = [tuple(int(i) for i in idx) if arr.ndim > 1 else int(idx[0])
             for idx in where[:max_shown]]
    more = f" and {count - max_shown} more" if count > max_shown else ""
    return (
        f"{name} contains {count} NaN value(s) out of {arr.size} "
        f"(at indices {shown}{more}); expected finite values. "
        "Drop or impute them before calling."
    )
