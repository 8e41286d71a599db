"""Experiment tracking: the one module of irm that talks to Weights & Biases.

Everything an experiment records goes through :class:`Tracker`, which

* writes a plain local copy of every metric (``run_dir/metrics.jsonl``),
  table (``run_dir/tables/``), summary (``run_dir/summary.json``), artifact
  record (``run_dir/artifacts.jsonl``) and the redacted config
  (``run_dir/tracker_config.json``), whatever the wandb mode, so results
  survive without wandb;
* mirrors them to wandb in ``"offline"`` mode (the default: nothing leaves
  the machine; upload later with ``wandb sync <tracker.wandb_dir>``),
  ``"online"`` mode, or not at all (``"disabled"``);
* never sends a secret: the config and artifact metadata pass through
  :func:`redact` first.

:func:`irm.run.wandb_offline.read_offline_run` parses an offline run's ``.wandb`` file so tests
and scripts can check what would be uploaded.

Example:
    >>> from pathlib import Path
    >>> import tempfile
    >>> with Tracker.open({"lr": 1e-3}, run_dir=Path(tempfile.mkdtemp()), mode="disabled") as t:
    ...     t.log({"train/loss": 0.5}, step=0)
    >>> (t.run_dir / "metrics.jsonl").read_text().count("train/loss")
    1
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from irm.core.io import redact
from irm.run.wandb_offline import FLUSH_TIMEOUT_S, wait_for_exit_record

__all__ = [
    "Tracker",
    "resolve_mode",
]

# --------------------------------------------------------------------------- modes

_MODE_ALIASES = {
    "offline": "offline",
    "dryrun": "offline",  # wandb's old name for offline
    "online": "online",
    "run": "online",  # wandb's old name for online
    "disabled": "disabled",
    "off": "disabled",
}


def resolve_mode(mode: str | None = None) -> str:
    """Return the tracking mode: ``"offline"``, ``"online"`` or ``"disabled"``.

    ``None`` reads ``IRM_WANDB_MODE``, then ``WANDB_MODE``, else ``"offline"``.
    ``"off"`` means ``"disabled"``; wandb's legacy ``"dryrun"``/``"run"`` are
    accepted as ``"offline"``/``"online"``.

    Example:
        >>> resolve_mode("off")
        'disabled'
    """
    origin = "mode argument"
    if mode is None:
        for variable in ("IRM_WANDB_MODE", "WANDB_MODE"):
            if os.environ.get(variable):
                mode, origin = os.environ[variable], f"environment variable {variable}"
                break
        else:
            return "offline"
    resolved = _MODE_ALIASES.get(str(mode).strip().lower())
    if resolved is None:
        raise ValueError(
            f"invalid tracking mode {mode!r} (from {origin}); valid modes: 'offline', 'online', "
            "'disabled' (or 'off'); e.g. export IRM_WANDB_MODE=offline"
        )
    return resolved


# --------------------------------------------------------------------------- tracker


class Tracker:
    """One tracked run: local files under ``run_dir`` plus an optional wandb run.

    Create it with :meth:`Tracker.open`, preferably as a context manager so
    the run is finished (with ``exit_code=1`` on an exception) in any case.

    Attributes:
        mode: ``"offline"``, ``"online"`` or ``"disabled"``.
        run_dir: directory holding ``metrics.jsonl`` and the other local files.
        nonfinite: ``{"key", "step", "value"}`` dicts for every NaN/inf logged.
        out_of_order: ``{"what", "step", "last_step"}`` dicts for log calls whose
            step went backwards (kept locally, not sent to wandb, which drops them).

    Example:
        >>> import tempfile
        >>> with Tracker.open({}, run_dir=Path(tempfile.mkdtemp()), mode="off") as t:
        ...     t.log({"eval/acc": float("nan")}, step=3)  # doctest: +SKIP
        >>> t.nonfinite  # doctest: +SKIP
        [{'key': 'eval/acc', 'step': 3, 'value': 'nan'}]
    """

    def __init__(self, *, run_dir: Path, mode: str, run: Any = None) -> None:
        # Use Tracker.open(); this constructor only stores what open() built.
        self.mode = mode
        self.run_dir = run_dir
        self.nonfinite: list[dict[str, Any]] = []
        self.out_of_order: list[dict[str, Any]] = []
        self._run = run
        self._last_step: int | None = None
        self._summary: dict[str, Any] = {}
        self._finished = False

    @classmethod
    def open(
        cls,
        config: Mapping[str, Any],
        *,
        run_dir: Path,
        project: str = "irm",
        mode: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        job_type: str = "run",
    ) -> Tracker:
        """Start a run writing under ``run_dir`` (created if missing).

        ``mode=None`` reads ``IRM_WANDB_MODE``, then ``WANDB_MODE``, else uses
        ``"offline"`` (see :func:`resolve_mode`). ``"online"`` needs
        ``wandb login`` or ``WANDB_API_KEY``, which wandb reads itself. wandb
        files go under ``run_dir / "wandb"``; wandb receives ``redact(config)``.

        Example:
            >>> import tempfile
            >>> t = Tracker.open({"seed": 0}, run_dir=Path(tempfile.mkdtemp()), mode="disabled")
            >>> t.mode, t.wandb_dir
            ('disabled', None)
            >>> t.finish()
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping (dict), got {type(config).__name__}; pass a dict")
        if isinstance(tags, str):
            raise TypeError(
                f"tags must be a sequence of strings, got the string {tags!r}; use tags=[{tags!r}]"
            )
        resolved = resolve_mode(mode)
        run_dir = Path(run_dir).expanduser()
        run_dir.mkdir(parents=True, exist_ok=True)
        safe_config = redact(dict(config))
        _write_json(run_dir / "tracker_config.json", safe_config)
        run = None
        if resolved != "disabled":
            run = _init_wandb(
                safe_config,
                run_dir=run_dir,
                project=project,
                mode=resolved,
                name=name,
                group=group,
                tags=list(tags),
                job_type=job_type,
            )
        return cls(run_dir=run_dir, mode=resolved, run=run)

    # ----------------------------------------------------------------- properties

    @property
    def wandb_dir(self) -> Path | None:
        """The wandb run directory (``.../wandb/offline-run-*`` offline) to pass to ``wandb sync``; None if disabled."""
        if self._run is None:
            return None
        return Path(self._run.settings.sync_dir)

    @property
    def run_path(self) -> Path | None:
        """Same as :attr:`wandb_dir` (the directory ``wandb sync`` takes)."""
        return self.wandb_dir

    @property
    def run_id(self) -> str | None:
        """wandb's run id, or None when disabled."""
        return None if self._run is None else str(self._run.id)

    @property
    def metrics_path(self) -> Path:
        """The local JSON-lines copy of every :meth:`log` call."""
        return self.run_dir / "metrics.jsonl"

    # ----------------------------------------------------------------- logging

    @property
    def current_step(self) -> int:
        """The highest step logged so far (0 before any): where a stage's one-off results go, since
        wandb drops rows whose step is below an earlier one."""
        return self._last_step or 0

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar ``metrics`` (keys ``"section/name"``) at ``step``.

        Several calls may share a step. A step below an earlier one is kept in
        the local file but not sent to wandb (which would drop it), with a
        warning and an entry in :attr:`out_of_order`. NaN/inf values are
        logged, and also recorded in :attr:`nonfinite` with a warning. Each
        call is appended to ``metrics.jsonl`` as
        ``{"step": ..., "time": ..., "<key>": value}``, with non-finite values
        written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` (valid JSON).

        Example:
            >>> import tempfile
            >>> t = Tracker.open({}, run_dir=Path(tempfile.mkdtemp()), mode="off")
            >>> t.log({"loss": 1.0}, step=0)  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ValueError: metric key 'loss' is not namespaced: ...
        """
        self._check_open()
        if not isinstance(metrics, Mapping):
            raise TypeError(
                f"metrics must be a mapping of 'section/name' -> number, got {type(metrics).__name__}"
            )
        step = self._check_step(step)
        values: dict[str, float] = {}
        for key, value in metrics.items():
            _check_key(key, what="metric key")
            values[key] = _to_float(key, value)
        bad = [
            {"key": k, "step": step, "value": _json_float(v)}
            for k, v in values.items()
            if not math.isfinite(v)
        ]
        if bad:
            self.nonfinite.extend(bad)
            warnings.warn(
                f"non-finite metric values at step {step}: "
                + ", ".join(f"{item['key']}={item['value']}" for item in bad)
                + " (logged anyway; see tracker.nonfinite)",
                RuntimeWarning,
                stacklevel=2,
            )
        line = {"step": step, "time": time.time(), **{k: _json_float(v) for k, v in values.items()}}
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line, allow_nan=False) + "\n")
        if not self._step_goes_back(step, f"metrics {sorted(values)}"):
            if self._run is not None:
                self._run.log(values, step=step)
            self._last_step = step

    def log_table(
        self,
        key: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        *,
        step: int | None = None,
    ) -> Path:
        """Log a table under ``key`` (``"section/name"``); return its local JSON path.

        The table is written to ``run_dir/tables/<key with / as __>.json`` and,
        unless disabled, logged as a ``wandb.Table`` at ``step`` (default: the
        last step logged, or 0).

        Example:
            >>> import tempfile
            >>> t = Tracker.open({}, run_dir=Path(tempfile.mkdtemp()), mode="off")
            >>> t.log_table("eval/samples", ["prompt", "reward"], [["Hi", 0.5]]).name
            'eval__samples.json'
        """
        self._check_open()
        _check_key(key, what="table key")
        if isinstance(columns, str) or not all(isinstance(c, str) for c in columns) or not columns:
            raise TypeError(f"columns must be a non-empty list of column names (str), got {columns!r}")
        rows = [list(row) for row in rows]
        for index, row in enumerate(rows):
            if len(row) != len(columns):
                raise ValueError(
                    f"table {key!r} row {index} has {len(row)} values but there are {len(columns)} columns "
                    f"{list(columns)}; give every row one value per column"
                )
        step = self._check_step((self._last_step or 0) if step is None else step)
        path = self.run_dir / "tables" / (key.replace("/", "__") + ".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(path, {"key": key, "step": step, "columns": list(columns), "rows": rows})
        if not self._step_goes_back(step, f"table {key!r}"):
            if self._run is not None:
                import wandb

                self._run.log({key: wandb.Table(columns=list(columns), data=rows)}, step=step)
            self._last_step = step
        return path

    def log_artifact(
        self,
        path: str | Path,
        name: str,
        type: str,  # noqa: A002 - matches wandb.Artifact's argument name
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Record a file or directory as a versioned artifact.

        ``metadata`` is redacted. A line is appended to
        ``run_dir/artifacts.jsonl`` in every mode; unless disabled the path is
        added to a ``wandb.Artifact`` (wandb copies it to its staging area, so
        later edits to the file do not change what is uploaded).

        Example:
            >>> import tempfile
            >>> d = Path(tempfile.mkdtemp())
            >>> _ = (d / "probe.json").write_text("{}")
            >>> t = Tracker.open({}, run_dir=d / "run", mode="off")
            >>> t.log_artifact(d / "probe.json", name="probe", type="probe")
        """
        self._check_open()
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"artifact path not found: {path.resolve()}; write the file before logging it"
            )
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            raise ValueError(
                f"invalid artifact name {name!r}; use only letters, digits, '-', '_' and '.', "
                "e.g. 'probe-layer12'"
            )
        if not isinstance(type, str) or not type.strip():
            raise ValueError(
                f"artifact type must be a non-empty string such as 'dataset' or 'model', got {type!r}"
            )
        safe_metadata = _jsonable(redact(dict(metadata or {})))
        record = {
            "name": name,
            "type": type,
            "path": str(path.resolve()),
            "metadata": safe_metadata,
            "time": time.time(),
        }
        with (self.run_dir / "artifacts.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, allow_nan=False, default=str) + "\n")
        if self._run is not None:
            import wandb

            artifact = wandb.Artifact(name, type=type, metadata=safe_metadata)
            if path.is_dir():
                artifact.add_dir(str(path))
            else:
                artifact.add_file(str(path))
            self._run.log_artifact(artifact)

    def summary(self, update: Mapping[str, Any]) -> None:
        """Set final/summary values (redacted); also kept in ``run_dir/summary.json``.

        Example:
            >>> import tempfile
            >>> t = Tracker.open({}, run_dir=Path(tempfile.mkdtemp()), mode="off")
            >>> t.summary({"eval/accuracy": 0.9})
            >>> json.loads((t.run_dir / "summary.json").read_text())
            {'eval/accuracy': 0.9}
        """
        self._check_open()
        if not isinstance(update, Mapping):
            raise TypeError(f"summary update must be a mapping, got {type(update).__name__}")
        safe = redact(dict(update))
        self._summary.update(safe)
        _write_json(self.run_dir / "summary.json", self._summary)
        if self._run is not None:
            self._run.summary.update(safe)

    def finish(self, exit_code: int = 0) -> None:
        """Finish the run (flushes wandb); calling it again does nothing.

        Example:
            >>> import tempfile
            >>> t = Tracker.open({}, run_dir=Path(tempfile.mkdtemp()), mode="off")
            >>> t.finish(); t.finish()
        """
        if self._finished:
            return
        self._finished = True
        if self._run is not None:
            sync_file = Path(self._run.settings.sync_file)
            self._run.finish(exit_code=exit_code)
            # wandb-core closes the .wandb file a few ms *after* finish()
            # returns; wait for it so `wandb sync` or read_offline_run right
            # after finish() see the whole run.
            wait_for_exit_record(sync_file, timeout=FLUSH_TIMEOUT_S)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Exceptions propagate; the run is still closed, marked as failed.
        self.finish(exit_code=0 if exc_type is None else 1)

    def __repr__(self) -> str:
        return f"Tracker(mode={self.mode!r}, run_dir={str(self.run_dir)!r}, run_id={self.run_id!r})"

    # ----------------------------------------------------------------- checks

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError(
                f"this Tracker ({self.run_dir}) is finished; open a new one with Tracker.open(...)"
            )

    def _check_step(self, step: Any) -> int:
        try:
            if isinstance(step, bool):
                raise TypeError
            step = operator.index(step)  # int or numpy integer, not float
        except TypeError:
            raise TypeError(f"step must be an int, got {type(step).__name__} {step!r}") from None
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return step

    def _step_goes_back(self, step: int, what: str) -> bool:
        """Warn and return True when ``step`` is below the last step sent to wandb.

        wandb drops such rows (silently, with silent=True), so they are kept
        only in the local files; a warning rather than an error, because a
        late stage re-logging step 0 should not crash a finished pipeline.
        """
        if self._last_step is None or step >= self._last_step:
            return False
        self.out_of_order.append({"what": what, "step": step, "last_step": self._last_step})
        if self._run is not None:
            warnings.warn(
                f"{what} at step {step} is below the last logged step {self._last_step}: wandb would drop it, "
                f"so it is only written to {self.run_dir} (see tracker.out_of_order); log steps in "
                "non-decreasing order to keep them in wandb",
                RuntimeWarning,
                stacklevel=3,
            )
        return True


def _init_wandb(config: dict[str, Any], *, run_dir: Path, mode: str, tags: list[str], **kwargs: Any) -> Any:
    try:
        import wandb
    except ImportError as err:
        raise RuntimeError(
            f"tracking mode {mode!r} needs the wandb package, which is not importable ({err}); "
            "install it (pip install wandb) or use mode='disabled' (IRM_WANDB_MODE=off)"
        ) from err

    settings = wandb.Settings(
        # silent: no banners and no interactive login prompt in logs/CI;
        # console="off": do not capture stdout/stderr (faster, and no copy
        # of printed text ends up in the run); create_new: several Trackers
        # may be open at once without finishing each other.
        silent=True,
        console="off",
        reinit="create_new",
    )
    try:
        return wandb.init(
            dir=str(run_dir), mode=mode, config=_jsonable(config), tags=tags, settings=settings, **kwargs
        )
    except Exception as err:
        hint = (
            "online mode needs credentials: run `wandb login` or set WANDB_API_KEY in the environment; "
            "or use mode='offline' (IRM_WANDB_MODE=offline) and upload later with `wandb sync`"
            if mode == "online"
            else "use mode='disabled' (IRM_WANDB_MODE=off) to run without wandb"
        )
        raise RuntimeError(f"wandb.init failed in {mode} mode ({type(err).__name__}: {err}); {hint}") from err


def _check_key(key: Any, *, what: str) -> None:
    if not isinstance(key, str):
        raise TypeError(f"{what} must be a str like 'train/loss', got {type(key).__name__} {key!r}")
    section, sep, rest = key.partition("/")
    if not sep or not section or not rest:
        raise ValueError(
            f"{what} {key!r} is not namespaced: keys must look like 'section/name' (e.g. 'train/{key or 'loss'}') "
            "so dashboards group them"
        )


def _to_float(key: str, value: Any) -> float:
    if isinstance(value, (str, bytes)):
        raise TypeError(
            f"metric {key!r} is a string ({value!r}); log numbers only, and use log_table for text"
        )
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"metric {key!r} has a non-numeric value of type {type(value).__name__}; log a float, int or "
            "0-d array (call .item() on tensors)"
        ) from err


def _json_float(value: float) -> float | str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _jsonable(obj: Any) -> Any:
    """Convert ``obj`` to plain JSON types (non-finite floats become strings)."""
    if isinstance(obj, float):
        return _json_float(obj)
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return _jsonable(obj.tolist())  # numpy / torch scalars and arrays
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def _write_json(path: Path, obj: Any) -> None:
    # Write then rename so a crash never leaves a half-written file.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)
