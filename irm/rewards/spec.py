"""Reward models named by one string, the same from the CLI (``--rm SPEC``), a config and Python.

=====================================  =====================================================================
spec                                   reward model
=====================================  =====================================================================
``vader``                              the VADER lexicon (:class:`~irm.rewards.TokenUtilityRM`)
``words.tsv`` / ``lexicon:PATH``       a ``word<TAB>utility`` lexicon
``classifier:DIR_OR_HUB_NAME``         a sequence-classification RM (a directory with a
                                       ``config.json`` of a ``*ForSequenceClassification`` model is
                                       recognised without the prefix; so is a hub name ``org/name``)
``probe:DIR`` / a probe directory      a saved linear IRM (``probe.json`` + ``probe.safetensors``)
``logratio:RUN_DIR``                   the log-ratio IRM of a run's pair (``logratio:BASE,TUNED``: of
                                       two model specs)
``KIND:ARG``                           any registered kind, ``ARG`` as its ``path``
=====================================  =====================================================================

Keyword arguments of the kind go with it: ``load_rm("classifier:my-rm", label="POSITIVE")``; on the
command line ``--rm 'classifier:my-rm?label=POSITIVE&input_format=concat'``.

>>> rm = load_rm("vader")
>>> rm.score(["The film was"], [" a great joy"])
array([1.18])
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from irm.rewards.base import BaseRewardModel, build_reward_model, reward_model_kinds

__all__ = ["load_rm", "parse_rm_spec"]


def _value(v: str) -> Any:
    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return v


def _is_classifier_dir(p: Path) -> bool:
    cfg = p / "config.json"
    if not cfg.is_file():
        return False
    try:
        archs = json.loads(cfg.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any("ForSequenceClassification" in a for a in archs)


def parse_rm_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``(kind, params)`` of a spec (see the module docstring); checks what can be checked without
    loading anything, so a typo fails in milliseconds."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"An RM spec must be a non-empty string, got {spec!r}; e.g. 'vader', 'words.tsv', "
                         "'classifier:DIR', 'probe:runs/NAME/irm_probe', 'logratio:runs/NAME'.")
    spec = spec.strip()
    params: dict[str, Any] = {}
    if "?" in spec:
        spec, query = spec.split("?", 1)
        params = {k: _value(v) for k, v in parse_qsl(query, keep_blank_values=True)}
    kinds = reward_model_kinds()
    head, sep, rest = spec.partition(":")
    if sep and head in kinds and not (len(head) == 1 and rest.startswith("\\")):  # not a Windows drive
        kind, arg = head, rest
    elif spec.lower() == "vader":
        return "lexicon", {"path": "vader", **params}
    else:
        p = Path(spec)
        if p.is_file() and p.suffix.lower() in (".tsv", ".txt"):
            kind, arg = "lexicon", spec
        elif p.is_dir() and (p / "probe.json").is_file():
            kind, arg = "probe", spec
        elif p.is_dir() and _is_classifier_dir(p):
            kind, arg = "classifier", spec
        elif p.is_dir() and (p / "results.json").is_file():
            kind, arg = "logratio", spec
        elif not p.exists() and spec.count("/") == 1 and not spec.startswith((".", "/")):
            kind, arg = "classifier", spec  # a hub name
        else:
            import difflib

            what = "exists but is none of a lexicon file, a probe, a classifier or a run directory" \
                if p.exists() else "is no file, directory, hub name (org/name) or KIND:ARG"
            close = difflib.get_close_matches(spec.lower(), ["vader", *kinds], n=1)
            if close and not p.exists():
                what += f" (did you mean {close[0]!r}?)"
            raise ValueError(f"RM spec {spec!r} {what}. Valid forms: 'vader', 'PATH.tsv', 'classifier:DIR_OR_HUB', "
                             f"'probe:DIR', 'logratio:RUN_DIR'; registered kinds: {kinds}.")
    if not arg:
        raise ValueError(f"RM spec {spec!r}: nothing after '{kind}:'; name a path (e.g. '{kind}:PATH').")
    if kind in ("lexicon", "probe") and arg.lower() != "vader" and not Path(arg).exists():
        raise FileNotFoundError(f"RM spec {spec!r}: {Path(arg).resolve()} does not exist.")
    return kind, {"path": arg, **params}


def load_rm(spec: str | BaseRewardModel, **params: Any) -> BaseRewardModel:
    """The reward model named by ``spec`` (an RM object is returned as it is)."""
    if isinstance(spec, BaseRewardModel):
        return spec
    kind, p = parse_rm_spec(spec)
    p.update(params)
    return build_reward_model(kind, **p)
