"""Reading an offline wandb run back: :func:`find_offline_run` finds a run's newest ``offline-run-*``
directory and :func:`read_offline_run` parses its ``.wandb`` file (a LevelDB-style log of protobuf
records) into config, history, summary and artifacts, so tests, notebooks and scripts can check what
would be uploaded without wandb's servers."""

from __future__ import annotations

import json
import struct
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["find_offline_run", "read_offline_run", "wait_for_exit_record", "FLUSH_TIMEOUT_S"]


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


FLUSH_TIMEOUT_S = 30.0


def wait_for_exit_record(path: Path, timeout: float) -> bool:
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
