"""Logging and progress bars: one place, so the CLI can make them quiet or verbose."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["get_logger", "setup_logging", "progress"]


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def setup_logging(level: str | int = "INFO") -> None:
    """Configure the ``irm`` loggers once (rich handler on a terminal, plain text otherwise)."""
    root = logging.getLogger("irm")
    if root.handlers:
        root.setLevel(level)
        return
    try:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False)
        fmt = "%(message)s"
    except ImportError:  # pragma: no cover - rich is a dependency
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    quiet_third_party_progress()


def quiet_third_party_progress() -> None:
    """With ``IRM_PROGRESS=0`` also silence the bars of transformers ("Loading weights") and datasets."""
    if os.environ.get("IRM_PROGRESS", "1") != "0":
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers is a dependency
        pass
    try:
        from datasets.utils import logging as ds_logging

        ds_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it", disable: bool | None = None):
    """A tqdm progress bar; off when ``IRM_PROGRESS=0`` (tests, CI logs)."""
    from tqdm.auto import tqdm

    if disable is None:
        disable = os.environ.get("IRM_PROGRESS", "1") == "0"
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, leave=False)
