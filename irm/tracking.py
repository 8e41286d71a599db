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

:func:`read_offline_run` parses an offline run's ``.wandb`` file so tests and
scripts can check what would be uploaded.

Example:
    >>> from pathlib import Path
    >>> import tempfile
    >>> with Tracker.open({"lr": 1e-3}, run_dir=Path(tempfile.mkdtemp()), mode="disabled") as t:
    ...     t.log({"train/loss": 0.5}, step=0)
    >>> (t.run_dir / "metrics.jsonl").read_text().count("train/loss")
    1
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import operator
import os
import re
import struct
import time
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "REDACTED",
    "Tracker",
    "find_offline_run",
    "read_offline_run",
    "redact",
    "resolve_mode",
]

REDACTED = "<redacted>"

# --------------------------------------------------------------------------- redaction

# Key words are matched on whole parts of a normalized key (lowercase,
# camelCase and punctuation split into "_"), so "client_secret" and "apiKey"
# match but "secretary" does not.
_SECRET_KEY_RE = re.compile(
    r"(?:^|_)(?:api_?key|apikey|secrets?|password|passwd|authorization|credentials?|private_key)(?:_|$)"
)
# "token" is everywhere in language-model configs (max_new_tokens, pad_token,
# pad_token_id, tokenizer): only a key *ending* in the part "token" counts,
# and not when the part before it names a tokenizer special token.
_TOKENIZER_WORDS = frozenset(
    {
        "pad", "eos", "bos", "unk", "sep", "cls", "mask", "special", "start", "end", "stop", "sos",
        "begin", "image", "additional", "sentinel", "chat", "think", "tool", "system", "user",
        "assistant", "prompt", "response", "separator", "reward", "value", "score", "label", "first",
        "last", "next", "max", "min", "new", "num", "target", "placeholder", "default",
    }
)  # fmt: skip
# Well-known token shapes (OpenAI "sk-...", Hugging Face "hf_...", new wandb
# keys "wandb_v1_..."). A minimum length keeps names such as "hf_transfer"
# from being mistaken for tokens; the look-behind finds them after a space
# ("Bearer sk-...") but not inside identifiers ("my_hf_dataset_...").
_SECRET_VALUE_RE = re.compile(
    r"(?<![A-Za-z0-9_])(?:sk-[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{20,}|wandb_v1_[A-Za-z0-9_\-]{16,})"
)
# Legacy wandb API keys are 40 hex characters; so are git commit hashes, so
# this shape only counts under a key that mentions "key".
_HEX40_RE = re.compile(r"[0-9a-fA-F]{40}")


def _normalize_key(key: object) -> str:
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key))
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _is_secret_key(key: object) -> bool:
    normalized = _normalize_key(key)
    if _SECRET_KEY_RE.search(normalized):
        return True
    parts = normalized.split("_")
    return parts[-1] == "token" and (len(parts) == 1 or parts[-2] not in _TOKENIZER_WORDS)


def _is_secret_value(value: str, key: object | None) -> bool:
    if _SECRET_VALUE_RE.search(value):
        return True
    return key is not None and "key" in str(key).lower() and _HEX40_RE.fullmatch(value.strip()) is not None


def redact(obj: Any) -> Any:
    """Return a deep copy of ``obj`` with secret values replaced by ``"<redacted>"``.

    ``obj`` is a (nested) config of dicts, lists, tuples and scalars; the
    input is never modified. A value is redacted when

    * its key names a secret (case-insensitive, on whole words of the key):
      ``api_key``/``apikey``, ``secret``, ``password``, ``authorization``,
      ``credential(s)``, ``private_key``, or a key ending in ``token`` (but
      not tokenizer keys such as ``pad_token`` or ``max_new_tokens``);
      ``None`` and booleans are kept (``use_auth_token: True`` is no secret);
    * or it is a string containing a token-shaped secret (``sk-...``,
      ``hf_...``, ``wandb_v1_...``), or a 40-hex-digit wandb key under a key
      mentioning "key".

    Dataclass instances become dicts. Other objects are deep-copied as is.

    Example:
        >>> redact({"model": "gpt2", "openai": {"apiKey": "abc"}, "max_new_tokens": 8})
        {'model': 'gpt2', 'openai': {'apiKey': '<redacted>'}, 'max_new_tokens': 8}
    """
    return _redact(obj, key=None)


def _redact(obj: Any, key: object | None) -> Any:
    if key is not None and _is_secret_key(key) and obj is not None and not isinstance(obj, bool):
        return REDACTED
    if isinstance(obj, str):
        return REDACTED if _is_secret_value(obj, key) else obj
    if isinstance(obj, bytes):
        return REDACTED if _is_secret_value(obj.decode("utf-8", "replace"), key) else obj
    if isinstance(obj, Mapping):
        return {k: _redact(v, key=k) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _redact(dataclasses.asdict(obj), key=key)
    if isinstance(obj, (list, tuple, set, frozenset)):
        # Elements inherit the parent key: {"keys": ["<40 hex>"]} is a key list.
        items = [_redact(item, key=key) for item in obj]
        return items if isinstance(obj, list) else type(obj)(items)
    return copy.deepcopy(obj)


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
            _wait_for_exit_record(sync_file, timeout=_FLUSH_TIMEOUT_S)

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


# --------------------------------------------------------------------------- offline runs


def find_offline_run(run_dir: str | Path) -> Path | None:
    """Return the newest ``offline-run-*`` directory for ``run_dir``, or None.

    ``run_dir`` may be a Tracker run directory (searched under ``wandb/``),
    a wandb directory, or an offline run directory itself.

    Example:
        >>> import tempfile
        >>> find_offline_run(tempfile.mkdtemp()) is None
        True
    """
    run_dir = Path(run_dir).expanduser()
    if run_dir.is_dir() and run_dir.name.startswith("offline-run-"):
        return run_dir
    candidates = [
        path
        for pattern in ("wandb/offline-run-*", "offline-run-*")
        for path in run_dir.glob(pattern)
        if path.is_dir()
    ]
    if not candidates:
        return None
    # Names start with a timestamp (second resolution); the mtime breaks ties.
    return max(candidates, key=lambda path: (path.name[len("offline-run-") :][:15], path.stat().st_mtime))


def read_offline_run(path: str | Path) -> dict[str, Any]:
    """Parse an offline wandb run into plain Python data.

    ``path`` is a Tracker ``run_dir``, an ``offline-run-*`` directory or its
    ``run-*.wandb`` file. Returns::

        {"run_id", "project", "config": {...}, "history": [row, ...],
         "summary": {...}, "artifacts": [name, ...],
         "artifact_records": [{"name", "type", "metadata", "files"}, ...],
         "files": [path, ...], "exit_code": int | None}

    History rows hold the logged keys plus wandb's ``_step``, ``_runtime``
    and ``_timestamp``; wandb's internal ``_wandb`` entries are dropped.

    The file is wandb's transaction log: the LevelDB log format (32 KiB
    blocks of CRC-checked chunks) holding ``wandb_internal_pb2.Record``
    protobufs. wandb >= 0.2x reads it in its Go core, with no Python reader
    left, so the framing is decoded here and the records with wandb's own
    protobuf classes.

    Example:
        >>> read_offline_run("/nonexistent")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: no offline wandb run found at ...
    """
    from wandb.proto import wandb_internal_pb2 as pb

    wandb_file = _resolve_wandb_file(Path(path).expanduser())
    result: dict[str, Any] = {
        "run_id": None,
        "project": None,
        "config": {},
        "history": [],
        "summary": {},
        "artifacts": [],
        "artifact_records": [],
        "files": [],
        "exit_code": None,
    }
    for data in _scan_leveldb_log(wandb_file):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            result["run_id"] = record.run.run_id
            result["project"] = record.run.project
            _apply_items(result["config"], record.run.config.update, record.run.config.remove)
        elif kind == "config":
            _apply_items(result["config"], record.config.update, record.config.remove)
        elif kind == "history":
            row: dict[str, Any] = {}
            _apply_items(row, record.history.item, ())
            result["history"].append(row)
        elif kind == "summary":
            _apply_items(result["summary"], record.summary.update, record.summary.remove)
        elif kind == "artifact":
            artifact = record.artifact
            result["artifacts"].append(artifact.name)
            result["artifact_records"].append(
                {
                    "name": artifact.name,
                    "type": artifact.type,
                    "metadata": json.loads(artifact.metadata) if artifact.metadata else {},
                    "files": [entry.path for entry in artifact.manifest.contents],
                }
            )
        elif kind == "files":
            result["files"].extend(item.path for item in record.files.files)
        elif kind == "exit":
            result["exit_code"] = record.exit.exit_code
    for section in ("config", "summary"):
        result[section].pop("_wandb", None)
    for row in result["history"]:
        row.pop("_wandb", None)
    return result


_FLUSH_TIMEOUT_S = 30.0


def _wait_for_exit_record(path: Path, timeout: float) -> bool:
    """Poll ``path`` until it holds wandb's exit record; warn and return False on timeout."""
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + timeout
    last_size = -1
    while True:
        size = path.stat().st_size if path.exists() else 0
        if size != last_size:  # re-parse only when the file grew
            last_size = size
            try:
                for data in _scan_leveldb_log(path):
                    record = pb.Record()
                    record.ParseFromString(data)
                    if record.WhichOneof("record_type") == "exit":
                        return True
            except (OSError, ValueError):
                pass  # header not written yet or a chunk in flight: poll again
        if time.monotonic() > deadline:
            warnings.warn(
                f"wandb had not finished writing {path} {timeout:.0f} s after finish(); the offline run "
                "may be incomplete (wandb sync would upload what is there)",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        time.sleep(0.01)


def _resolve_wandb_file(path: Path) -> Path:
    if path.is_file() and path.suffix == ".wandb":
        return path
    run = path if path.is_dir() and any(path.glob("*.wandb")) else find_offline_run(path)
    files = sorted(run.glob("*.wandb")) if run is not None else []
    if not files:
        raise FileNotFoundError(
            f"no offline wandb run found at {path.resolve()}; pass a Tracker run_dir opened in offline mode, "
            "an offline-run-* directory or its run-*.wandb file"
        )
    return files[0]


_LOG_HEADER = struct.Struct("<4sHB")  # ident, magic, version
_CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, chunk type
_BLOCK_SIZE = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_WANDB_IDENT, _WANDB_MAGIC, _WANDB_VERSION = b":W&B", 0xBEE1, 0


def _scan_leveldb_log(path: Path) -> Iterator[bytes]:
    """Yield the payloads of a wandb transaction log, checking every CRC."""
    data = path.read_bytes()
    if len(data) < _LOG_HEADER.size:
        raise ValueError(f"{path} is {len(data)} bytes, too short for a wandb run file header")
    ident, magic, version = _LOG_HEADER.unpack_from(data, 0)
    if (ident, magic, version) != (_WANDB_IDENT, _WANDB_MAGIC, _WANDB_VERSION):
        raise ValueError(
            f"{path} does not start with a wandb run file header (got ident={ident!r}, magic={magic:#x}, "
            f"version={version}; expected {_WANDB_IDENT!r}, {_WANDB_MAGIC:#x}, {_WANDB_VERSION}); "
            "it may be from an incompatible wandb version"
        )
    # wandb seeds the CRC with the chunk type byte (zlib crc32, not crc32c).
    seeds = {t: zlib.crc32(bytes([t])) for t in (_FULL, _FIRST, _MIDDLE, _LAST)}
    offset = _LOG_HEADER.size
    pending: bytes | None = None
    while offset < len(data):
        space = _BLOCK_SIZE - offset % _BLOCK_SIZE
        if space < _CHUNK_HEADER.size:  # block trailer padding
            offset += space
            continue
        if offset + _CHUNK_HEADER.size > len(data):
            break  # a run still being written may end mid-chunk
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, offset)
        if kind == 0 and length == 0:  # zero-filled rest of a block
            offset += space
            continue
        start = offset + _CHUNK_HEADER.size
        if start + length > len(data):
            break
        chunk = data[start : start + length]
        if kind not in seeds or zlib.crc32(chunk, seeds[kind]) != crc:
            raise ValueError(f"{path}: corrupt chunk at byte {offset} (type {kind}, bad checksum)")
        offset = start + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif pending is not None:
            pending += chunk
            if kind == _LAST:
                yield pending
                pending = None


def _apply_items(target: dict[str, Any], updates: Any, removes: Any) -> None:
    """Apply wandb config/summary/history items (``key`` or ``nested_key`` path + ``value_json``)."""
    for item in updates:
        keys = list(item.nested_key) or [item.key]
        node = target
        for part in keys[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[keys[-1]] = json.loads(item.value_json)  # accepts NaN/Infinity
    for item in removes:
        keys = list(item.nested_key) or [item.key]
        node = target
        for part in keys[:-1]:
            node = node.get(part, {})
        if isinstance(node, dict):
            node.pop(keys[-1], None)
