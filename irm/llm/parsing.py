"""Reply parsing: :func:`parse_reply` turns a raw reply into a :class:`ParsedReply` that records
success or failure with an excerpt of the text. A reply that does not parse is counted
(:class:`ParseLog`), never a crash and never a silent default. New formats register with
:func:`register_parser`."""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ParsedReply", "ParseLog", "ReplyParseError", "parse_reply", "register_parser", "REPLY_PARSERS"]

class ReplyParseError(ValueError):
    """Raised by a parser when a reply does not have the expected form (caught by parse_reply)."""


@dataclass(frozen=True)
class ParsedReply:
    """The outcome of parsing one reply: ``ok`` with a ``value``, or not ok with an ``error``.

    ``excerpt`` is the start of the raw text, so a failure can be inspected in a results file.
    """

    kind: str
    ok: bool
    value: Any = None
    error: str | None = None
    excerpt: str = ""

    def unwrap(self) -> Any:
        """The value; raises :class:`ReplyParseError` when parsing failed."""
        if not self.ok:
            raise ReplyParseError(f"{self.kind} reply did not parse ({self.error}): {self.excerpt!r}")
        return self.value

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ParseLog:
    """Counts of parsed and failed replies per kind, with the first ``max_failures`` failures kept.

    >>> plog = ParseLog()
    >>> _ = parse_reply("maybe", "label01", log=plog)
    >>> plog.counts
    {'label01': {'ok': 0, 'failed': 1}}
    """

    max_failures: int = 50
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def record(self, parsed: ParsedReply, **context: Any) -> ParsedReply:
        c = self.counts.setdefault(parsed.kind, {"ok": 0, "failed": 0})
        c["ok" if parsed.ok else "failed"] += 1
        if not parsed.ok and len(self.failures) < self.max_failures:
            self.failures.append({"kind": parsed.kind, "error": parsed.error, "excerpt": parsed.excerpt, **context})
        return parsed

    @property
    def n_failed(self) -> int:
        return sum(c["failed"] for c in self.counts.values())

    @property
    def n_ok(self) -> int:
        return sum(c["ok"] for c in self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"counts": self.counts, "n_ok": self.n_ok, "n_failed": self.n_failed, "failures": self.failures}


REPLY_PARSERS: dict[str, Callable[..., Any]] = {}


def register_parser(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(text, **options) -> value`` (raising :class:`ReplyParseError`) as a reply kind."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if kind in REPLY_PARSERS:
            raise ValueError(f"Reply parser {kind!r} is registered twice.")
        REPLY_PARSERS[kind] = fn
        return fn

    return deco


def parse_reply(text: Any, kind: str, *, log: ParseLog | None = None, excerpt_chars: int = 200,
                **options: Any) -> ParsedReply:
    """Parse an LLM reply of form ``kind`` (see :data:`REPLY_PARSERS`); never raises on a bad reply.

    Kinds: ``"label01"`` (a 0/1 or yes/no label), ``"json"`` (the first JSON object in the text),
    ``"spans"`` (a list of phrases; ``source=`` keeps those that occur in it), ``"mapping"`` (phrase ->
    rewrite pairs, JSON or ``a -> b`` lines; ``source=`` as for spans), ``"text"`` (a rewritten text,
    stripped of fences, quotes and "Here is..." preambles).

    >>> parse_reply('Sure: ["boring", "awful"]', "spans", source="A boring, awful film").value
    ['boring', 'awful']
    >>> r = parse_reply("no idea", "json"); (r.ok, r.error)
    (False, 'no JSON object found')
    """
    if kind not in REPLY_PARSERS:
        close = difflib.get_close_matches(kind, REPLY_PARSERS, n=1)
        raise ValueError(f"Unknown reply kind {kind!r}; valid kinds: {sorted(REPLY_PARSERS)}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    raw = "" if text is None else str(text)
    excerpt = raw[:excerpt_chars]
    try:
        result = ParsedReply(kind, True, REPLY_PARSERS[kind](raw, **options), None, excerpt)
    except ReplyParseError as e:
        result = ParsedReply(kind, False, None, str(e), excerpt)
    if log is not None:
        log.record(result)
    return result


_FENCE = re.compile(r"```[a-zA-Z]*\s*(.*?)```", re.S)


def _unfence(text: str) -> str:
    m = _FENCE.search(text)
    return m.group(1) if m else text


def _json_values(text: str, opener: str):
    """Every JSON value starting at an ``opener`` character, in order."""
    dec = json.JSONDecoder()
    for src in dict.fromkeys((_unfence(text), text)):
        for m in re.finditer(re.escape(opener), src):
            try:
                yield dec.raw_decode(src, m.start())[0]
            except ValueError:
                continue


@register_parser("label01")
def _parse_label01(text: str) -> int:
    """A leading 0/1, a leading "yes"/"no"/"true"/"false" standing alone ("No, ...", "Yes | x", not "no idea"),
    else the one digit 0 or 1 that appears as a label anywhere ("Label: 1")."""
    t = text.strip().lower()
    m = re.match(r"^\W*([01])(?!\w|\.\d)", t) or re.match(r"^\W*(yes|no|true|false)\s*(?:[.,:;!)|\-]|$)", t)
    if m:
        return int(m.group(1) in ("1", "yes", "true"))
    found = {int(x) for x in re.findall(r"(?<![\w.])([01])(?!\w|\.\d)", t)}
    if len(found) == 1:
        return found.pop()
    raise ReplyParseError("no 0/1 label found" if not found else "ambiguous: both 0 and 1 appear")


@register_parser("json")
def _parse_json(text: str, required_keys: Sequence[str] = ()) -> dict[str, Any]:
    for v in _json_values(text, "{"):
        if isinstance(v, dict):
            missing = [k for k in required_keys if k not in v]
            if missing:
                raise ReplyParseError(f"JSON object lacks key(s) {missing}")
            return v
    raise ReplyParseError("no JSON object found")


def _in_source(phrases: list[str], source: str | None) -> list[str]:
    if source is None:
        return phrases
    low = source.lower()
    return [p for p in phrases if p.lower() in low]


@register_parser("spans")
def _parse_spans(text: str, source: str | None = None, max_spans: int | None = None) -> list[str]:
    spans: list[str] | None = None
    for v in _json_values(text, "["):
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            spans = v
            break
    if spans is None:
        for v in _json_values(text, "{"):
            if isinstance(v, dict):
                lists = [x for x in v.values() if isinstance(x, list) and all(isinstance(s, str) for s in x)]
                if lists:
                    spans = lists[0]
                    break
    if spans is None:  # bullets, numbered lines or quoted phrases
        lines = [re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s+", "", ln) for ln in text.splitlines()
                 if re.match(r"^\s*(?:[-*\u2022]|\d+[.)])\s+", ln)]
        spans = lines or re.findall(r'"([^"\n]{1,80})"', text)
    spans = [s.strip().strip("\"'").strip() for s in spans]
    spans = list(dict.fromkeys(s for s in spans if s))
    if not spans:
        raise ReplyParseError("no spans found (expected a JSON list of strings)")
    kept = _in_source(spans, source)
    if not kept:
        raise ReplyParseError(f"none of the {len(spans)} spans occurs in the source text")
    return kept[:max_spans] if max_spans else kept


@register_parser("mapping")
def _parse_mapping(text: str, source: str | None = None) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for v in _json_values(text, "{"):
        if isinstance(v, dict):
            pairs = {str(k).strip(): str(x).strip() for k, x in v.items() if isinstance(x, (str, int, float))}
            if pairs:
                break
    if not pairs:
        for ln in text.splitlines():
            m = re.match(r'^\s*(?:[-*\u2022]|\d+[.)])?\s*"?([^"\n]+?)"?\s*(?:->|=>|\u2192)\s*"?([^"\n]*?)"?\s*$', ln)
            if m:
                pairs[m.group(1).strip()] = m.group(2).strip()
    if not pairs:
        raise ReplyParseError("no phrase -> rewrite pairs found (expected a JSON object)")
    if source is not None:
        low = source.lower()
        pairs = {k: v for k, v in pairs.items() if k and k.lower() in low}
        if not pairs:
            raise ReplyParseError("none of the phrases to rewrite occurs in the source text")
    pairs = {k: v for k, v in pairs.items() if k and k != v}
    if not pairs:
        raise ReplyParseError("every rewrite equals its phrase (nothing changed)")
    return pairs


_PREAMBLE = re.compile(r"^\s*(?:sure[,!.]?\s*)?(?:here(?:'s| is)[^:\n]*:|rewritten(?: response| text)?:|"
                       r"response:|answer:)\s*", re.I)


@register_parser("text")
def _parse_text(text: str) -> str:
    t = _unfence(text).strip()
    t = _PREAMBLE.sub("", t).strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
        t = t[1:-1].strip()
    if not t:
        raise ReplyParseError("empty reply")
    return t
