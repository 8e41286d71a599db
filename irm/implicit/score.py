"""Score words or (prompt, response) pairs with any reward model, explicit or implicit: ``irm score``.

>>> score_words([load_rm("vader"), load_rm("probe:runs/default/irm_probe")], ["great", "awful", "table"])
>>> score_pairs([load_rm("vader")], ["The movie was"], [" wonderful"])
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from irm.rewards.utilities import word_utilities

__all__ = ["score_words", "score_pairs", "read_pairs"]


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def score_words(rms: Sequence[Any], words: Sequence[str], *, templates: str | Sequence[str] = "reviews") -> list[dict]:
    """One row per word: each RM's utility of it (a lexicon's table value, None for a word it lacks; a
    probe IRM's read-out; any other RM's template score against neutral words, with its spread)."""
    if not words:
        raise ValueError("No words to score.")
    rows: list[dict[str, Any]] = [{"word": w} for w in words]
    for rm in rms:
        wu = word_utilities(rm, list(words), templates=templates)
        for row, v, sp in zip(rows, wu.values, wu.spread, strict=True):
            row[rm.name] = _finite(v)
            if wu.method == "templates":
                row[f"{rm.name}/spread"] = _finite(sp)
    return rows


def score_pairs(rms: Sequence[Any], prompts: Sequence[str], responses: Sequence[str]) -> list[dict]:
    """One row per (prompt, response): each RM's reward."""
    if not prompts:
        raise ValueError("No (prompt, response) pairs to score.")
    rows: list[dict[str, Any]] = [{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)]
    for rm in rms:
        for row, v in zip(rows, rm.score(list(prompts), list(responses)), strict=True):
            row[rm.name] = _finite(v)
    return rows


def read_pairs(path: str | Path, *, prompt_field: str = "prompt", response_field: str = "response",
               ) -> tuple[list[str], list[str]]:
    """(prompts, responses) of a JSONL or CSV file, with a clear error for a missing file or column."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path.resolve()} does not exist; --pairs takes a .jsonl or .csv file with "
                                f"'{prompt_field}' and '{response_field}' columns.")
    if path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not JSON ({e.msg}); one JSON object per line.") from None
    if not rows:
        raise ValueError(f"{path} holds no rows.")
    for field in (prompt_field, response_field):
        missing = [i for i, r in enumerate(rows, 1) if not isinstance(r, dict) or field not in r]
        if missing:
            cols = sorted(rows[0]) if isinstance(rows[0], dict) else []
            raise ValueError(f"{path}: row {missing[0]} has no {field!r} field (columns: {cols}); name the "
                             "columns with --prompt-field / --response-field.")
    return [str(r[prompt_field]) for r in rows], [str(r[response_field]) for r in rows]
