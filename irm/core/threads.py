"""The two models of a pair, side by side on a CPU.

torch splits every matrix product of a forward pass over all of a CPU's threads. At the shapes of a
small model (hundreds of rows of width 576 on SmolLM2) that split wastes a fifth of the cores. The
base and the tuned model of a pair never depend on each other, so where both run on the same inputs
(log-ratio scoring, capture, generation, the KL of the evaluation) they run at the same time instead,
in two Python threads, each with its share of torch's threads. torch releases the GIL inside its
operators, so the two passes overlap. On the 2-core CPU of our benchmarks this gives 1.2-1.7x the
throughput of running them one after the other (``benchmarks/bench_threads.py``). The passes are the
same, in the same order; only torch's thread count per pass differs, which in a few CPU kernels changes
the order of a sum: values move by float rounding (about 1e-7 relative). On the default experiment
every sampled token and every headline number stayed the same.

It is used only where it helps: every model on a CPU, at least two torch threads, at least two distinct
models. ``IRM_MODEL_THREADS=0`` turns it off (then everything runs one model after the other, as a
debugger or profiler may prefer).

>>> with ModelThreads([pair.base, pair.tuned]) as mt:
...     lp_base, lp_tuned = mt.map([lambda: score(pair.base), lambda: score(pair.tuned)])
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

__all__ = ["ModelThreads", "run_side_by_side", "side_by_side_enabled"]

T = TypeVar("T")

ENV_SWITCH = "IRM_MODEL_THREADS"


def _key(model: Any) -> int:
    """Two LoadedModels around one HF model are one model (they share its modules and hooks)."""
    return id(getattr(model, "hf_model", model))


def _device_of(model: Any) -> torch.device | None:
    dev = getattr(model, "device", None)
    if isinstance(dev, (str, torch.device)):
        return torch.device(dev)
    params = getattr(model, "parameters", None)
    if callable(params):
        p = next(iter(params()), None)
        return None if p is None else p.device
    return None


def side_by_side_enabled(models: Iterable[Any], *, distinct: bool = True) -> bool:
    """Whether ``models`` (LoadedModels or torch modules) would run side by side: at least two distinct
    ones (``distinct=False``: at least two calls, which may run the same model on different inputs),
    all on a CPU, torch using at least two threads, and ``IRM_MODEL_THREADS`` not ``0``."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    models = list(models)
    distinct_models = {_key(m): m for m in models}
    if (len(distinct_models) if distinct else len(models)) < 2 or torch.get_num_threads() < 2:
        return False
    devices = [_device_of(m) for m in distinct_models.values()]
    return all(d is not None and d.type == "cpu" for d in devices)


class ModelThreads:
    """A pool that runs one call per model at the same time, each with ``threads // len(models)`` torch
    threads; or, where that does not help (see :func:`side_by_side_enabled`), one call after the other.

    Use it as a context manager: leaving it restores torch's thread count. Grad mode and inference mode
    of the calling thread carry over into the calls (they are thread-local in torch). An exception in
    any call is raised after all calls have finished, so no thread keeps running behind it.

    ``distinct=False`` counts every entry of ``models`` as one call even where a model appears twice:
    one model running two halves of a batch at once. A forward pass only reads a model's weights, so
    two passes of one model can run at the same time; what the caller shares between its calls (a
    key/value cache to copy from, say) must be read-only too.
    """

    def __init__(self, models: Sequence[Any], *, enabled: bool | None = None, distinct: bool = True) -> None:
        self.n = len({_key(m) for m in models}) if distinct else len(models)
        self.active = (side_by_side_enabled(models, distinct=distinct) if enabled is None
                       else (enabled and self.n >= 2))
        self._threads = torch.get_num_threads()
        self.per_call = max(1, self._threads // max(self.n, 1))
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> ModelThreads:
        if self.active:
            self._pool = ThreadPoolExecutor(max_workers=self.n, thread_name_prefix="irm-model")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
            # torch.set_num_threads in a worker also sets process-wide state (MKL's count): put it back.
            torch.set_num_threads(self._threads)

    def map(self, calls: Sequence[Callable[[], T]]) -> list[T]:
        """``[call() for call in calls]``, the calls running at the same time when active."""
        if self._pool is None or len(calls) < 2:
            return [c() for c in calls]
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        per_call = self.per_call

        def run(call: Callable[[], T]) -> T:
            torch.set_num_threads(per_call)
            if inference:
                with torch.inference_mode():
                    return call()
            with torch.set_grad_enabled(grad):
                return call()

        futures = [self._pool.submit(run, c) for c in calls]
        results: list[T] = []
        error: BaseException | None = None
        for f in futures:
            try:
                results.append(f.result())
            except BaseException as e:  # noqa: BLE001 - re-raised below, once every call has ended
                error = error or e
        if error is not None:
            raise error
        return results


def run_side_by_side(calls: Sequence[Callable[[], T]], models: Sequence[Any]) -> list[T]:
    """One-off :meth:`ModelThreads.map`: ``calls[i]`` runs ``models[i]``."""
    with ModelThreads(models) as mt:
        return mt.map(calls)
