"""Small, deterministic text edits that record what they changed; and word-level edit distance.

Every edit function returns an :class:`EditResult` (the new text and the :class:`Edit` list) or a
string saying why it does not apply to this text (e.g. "no refusal phrase to remove"): a perturbation
that cannot be made is reported as such, never faked by returning the text unchanged.

>>> r = swap_words("A good film, truly good.", {"good": "bad"})
>>> r.text, len(r.edits)
('A bad film, truly bad.', 2)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "Edit",
    "EditResult",
    "match_case",
    "swap_words",
    "delete_phrases",
    "insert_sentence",
    "insert_clause",
    "words",
    "word_edit_distance",
    "edit_ops",
    "normalized_edit_distance",
    "sentences",
    "article_for",
    "fix_articles",
    "article_errors",
    "trim_last_clause",
    "dangling_endings",
    "close_orphaned_conjunctions",
]


@dataclass(frozen=True)
class Edit:
    """One change: ``op`` is "replace", "insert" or "delete".

    ``start`` locates it in the original: a char offset, or a word index for word-level noise edits.
    """

    op: str
    before: str
    after: str
    start: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EditResult:
    text: str
    edits: tuple[Edit, ...]


def match_case(src: str, repl: str) -> str:
    """``repl`` in the case pattern of ``src`` (UPPER, Capitalised or as is)."""
    if len(src) > 1 and src.isupper():
        return repl.upper()
    if src[:1].isupper():
        return repl[:1].upper() + repl[1:]
    return repl


def _alternation(phrases: Sequence[str]) -> str:
    # Longest first, so "a lot" wins over "a" and "I think" over "I".
    return "|".join(re.escape(p) for p in sorted(set(phrases), key=len, reverse=True))


def swap_words(
    text: str, mapping: Mapping[str, str], *, rng: np.random.Generator | None = None, max_swaps: int | None = None
) -> EditResult | None:
    """Replace whole-word occurrences of ``mapping``'s keys (case-insensitive, case kept).

    All occurrences by default; ``max_swaps`` with ``rng`` picks that many at random. ``None`` when no
    key occurs.
    """
    if not mapping:
        return None
    low = {k.lower(): v for k, v in mapping.items()}
    pat = re.compile(r"(?<![\w'])(" + _alternation(list(low)) + r")(?![\w'])", re.I)
    matches = list(pat.finditer(text))
    if not matches:
        return None
    if max_swaps is not None and len(matches) > max_swaps:
        rng = rng or np.random.default_rng(0)
        keep = sorted(rng.choice(len(matches), size=max_swaps, replace=False).tolist())
        matches = [matches[i] for i in keep]
    out, edits, pos = [], [], 0
    for m in matches:
        new = match_case(m.group(0), low[m.group(0).lower()])
        out.append(text[pos : m.start()])
        out.append(new)
        edits.append(Edit("replace", m.group(0), new, m.start()))
        pos = m.end()
    out.append(text[pos:])
    return EditResult("".join(out), tuple(edits))


def _tidy(text: str) -> str:
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r"\s+([,.!?;:])", r"\1", text)
    text = re.sub(r"([,;:])\s*([.!?])", r"\2", text)
    text = re.sub(r"^(\s*)[,;:]\s*", r"\1", text)
    return text


def delete_phrases(text: str, patterns: Sequence[str]) -> EditResult | None:
    """Delete every match of the regex ``patterns`` (case-insensitive) and tidy the spacing.

    ``None`` when nothing matches.
    """
    pat = re.compile("|".join(f"(?:{p})" for p in patterns), re.I)
    matches = [m for m in pat.finditer(text) if m.group(0).strip()]
    if not matches:
        return None
    out, edits, pos = [], [], 0
    for m in matches:
        out.append(text[pos : m.start()])
        edits.append(Edit("delete", m.group(0), "", m.start()))
        pos = m.end()
    out.append(text[pos:])
    lead = text[: len(text) - len(text.lstrip())]
    new = _tidy("".join(out))
    # Keep the original leading whitespace: a response often continues its prompt after a space.
    new = lead + new.lstrip()
    if new.strip() and text.strip()[:1].isupper():
        body = new[len(lead):]
        new = lead + body[:1].upper() + body[1:]
    # A sentence whose first words were deleted starts with a capital again ("I suppose it is" -> "It is").
    was_lower = {m.group(2) for m in re.finditer(r"([.!?]\s+)([a-z][\w']*)", text)}
    new = re.sub(r"([.!?]\s+)([a-z][\w']*)",
                 lambda m: m.group(0) if m.group(2) in was_lower else m.group(1) + m.group(2)[:1].upper() + m.group(2)[1:],
                 new)
    return EditResult(new, tuple(edits))


def sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) char spans of the sentences of ``text`` (end includes the final punctuation)."""
    spans, start = [], 0
    for m in re.finditer(r"[.!?]+(?=\s|$)", text):
        if text[start : m.end()].strip():
            spans.append((start, m.end()))
        start = m.end()
    if text[start:].strip():
        spans.append((start, len(text.rstrip())))
    return spans


def insert_sentence(text: str, sentence: str, *, position: str = "auto") -> EditResult:
    """Add a whole sentence at the start or the end.

    ``position="auto"`` prepends when the text starts like a sentence (a capital letter) and appends
    otherwise, so a response that continues its prompt mid-sentence stays readable.
    """
    if position not in ("auto", "start", "end"):
        raise ValueError(f"position must be 'auto', 'start' or 'end', got {position!r}")
    stripped = text.strip()
    if position == "auto":
        position = "start" if stripped[:1].isupper() else "end"
    lead = text[: len(text) - len(text.lstrip())]
    trail = text[len(text.rstrip()) :]
    if position == "start" or not stripped:
        new = lead + sentence + (" " + stripped if stripped else "") + trail
        return EditResult(new, (Edit("insert", "", sentence, len(lead)),))
    body = text.rstrip()
    sep = " " if body[-1:] in ".!?\"')" else ". "
    new = body + sep + sentence + trail
    return EditResult(new, (Edit("insert", "", sentence, len(body)),))


def insert_clause(text: str, clause: str, rng: np.random.Generator) -> EditResult:
    """Insert ``clause`` (e.g. ", I think") before the final punctuation of a random sentence."""
    spans = sentences(text)
    if not spans:
        return insert_sentence(text, clause.lstrip(", "), position="end")
    s, e = spans[int(rng.integers(len(spans)))]
    seg = text[s:e]
    m = re.search(r"[.!?]+$", seg)
    at = s + (m.start() if m else len(seg))
    # Strip a trailing comma/space before the insertion point so ", I think" does not double up.
    while at > s and text[at - 1] in " ,":
        at -= 1
    new = text[:at] + clause + text[at:]
    return EditResult(new, (Edit("insert", "", clause, at),))


def words(text: str) -> list[str]:
    """Whitespace words: the unit of edit distances and of the random baseline's substitutions."""
    return text.split()


def word_edit_distance(a: str | Sequence[str], b: str | Sequence[str]) -> int:
    """Levenshtein distance between two word sequences (insert, delete, substitute cost 1)."""
    x = words(a) if isinstance(a, str) else list(a)
    y = words(b) if isinstance(b, str) else list(b)
    if len(x) < len(y):
        x, y = y, x
    # Skip the common prefix and suffix: most perturbations change a few words in the middle.
    i = 0
    while i < len(y) and x[i] == y[i]:
        i += 1
    x, y = x[i:], y[i:]
    j = 0
    while j < len(y) and x[len(x) - 1 - j] == y[len(y) - 1 - j]:
        j += 1
    x, y = x[: len(x) - j], y[: len(y) - j]
    if not y:
        return len(x)
    prev = list(range(len(y) + 1))
    for xi in x:
        cur = [prev[0] + 1]
        for k, yk in enumerate(y, start=1):
            cur.append(min(prev[k] + 1, cur[k - 1] + 1, prev[k - 1] + (xi != yk)))
        prev = cur
    return prev[-1]


def edit_ops(a: str | Sequence[str], b: str | Sequence[str]) -> tuple[int, int, int]:
    """(substitutions, insertions, deletions) of a minimal word-level alignment turning ``a`` into ``b``.

    >>> edit_ops("a good film", "a very bad film")
    (1, 1, 0)
    """
    x = words(a) if isinstance(a, str) else list(a)
    y = words(b) if isinstance(b, str) else list(b)
    n, m = len(x), len(y)
    d = np.zeros((n + 1, m + 1), dtype=np.int64)
    d[:, 0] = np.arange(n + 1)
    d[0, :] = np.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d[i, j] = min(d[i - 1, j] + 1, d[i, j - 1] + 1, d[i - 1, j - 1] + (x[i - 1] != y[j - 1]))
    sub = ins = dele = 0
    i, j = n, m
    while i > 0 or j > 0:
        if i > 0 and j > 0 and d[i, j] == d[i - 1, j - 1] + (x[i - 1] != y[j - 1]):
            sub += x[i - 1] != y[j - 1]
            i, j = i - 1, j - 1
        elif j > 0 and d[i, j] == d[i, j - 1] + 1:
            ins += 1
            j -= 1
        else:
            dele += 1
            i -= 1
    return sub, ins, dele


def normalized_edit_distance(a: str, b: str) -> float:
    """Word edit distance divided by the longer length: 0 (same) to 1 (nothing in common)."""
    n = max(len(words(a)), len(words(b)))
    return 0.0 if n == 0 else word_edit_distance(a, b) / n


# ----------------------------------------------------------------------------------------------
# Articles: "a amazing" -> "an amazing", "An boring" -> "A boring"
_AN_BEFORE_CONSONANT = re.compile(r"^(?:hour|honest|honou?r|heir|herb)", re.I)  # silent h: "an hour"
# Vowel letters with a consonant sound: "a unique", "a useful", "a European", "a one-off", "a once".
_A_BEFORE_VOWEL = re.compile(r"^(?:uni(?![nmdl])|use|usu|usa|uti|ura|uro|uku|ubiq|eu|ewe|one(?!r|ss)|once)", re.I)
_AN_NUMBER = re.compile(r"^(?:8|1[18](?:\d\d)?(?![\d])|1[18],\d{3})")  # "an 8", "an 11", "an 18th", "an 1800s"
_ARTICLE_RE = re.compile(r"(?<![\w'-])(a|an|A|An|AN)(\s+)([\"'(]?)([A-Za-z0-9][\w'-]*)")


def article_for(word: str) -> str | None:
    """``"a"`` or ``"an"`` for the word that follows the article; None when unsure (acronyms, symbols)."""
    w = word.strip("\"'(")
    if not w:
        return None
    if w[0].isdigit():
        return "an" if _AN_NUMBER.match(w) else "a"
    if len(w) > 1 and w.isupper():
        return None  # "an MBA", "a NATO": by letter names, not worth guessing
    if _AN_BEFORE_CONSONANT.match(w):
        return "an"
    if _A_BEFORE_VOWEL.match(w):
        return "a"
    return "an" if w[0].lower() in "aeiou" else "a"


def _article_mismatches(text: str) -> list[tuple[re.Match, str]]:
    out = []
    for m in _ARTICLE_RE.finditer(text):
        art, word = m.group(1), m.group(4)
        if art[0] == "A" and not _sentence_start(text, m.start()):
            continue  # "Plan A is", "grade A eggs": a capital A mid-sentence is a letter, not the article
        want = article_for(word)
        if want is not None and want != art.lower():
            out.append((m, want))
    return out


def _sentence_start(text: str, pos: int) -> bool:
    before = text[:pos].rstrip()
    return not before or before[-1] in ".!?\"'\n:"


def article_errors(text: str, original: str | None = None) -> list[str]:
    """``"a amazing"``-style disagreements in ``text`` (those already in ``original`` excepted)."""
    known = {m.group(0).lower() for m, _ in _article_mismatches(original)} if original is not None else set()
    return [m.group(0) for m, _ in _article_mismatches(text) if m.group(0).lower() not in known]


def fix_articles(text: str, original: str | None = None) -> EditResult:
    """Make each article agree with the next word; mismatches already in ``original`` are left alone.

    >>> fix_articles("It was a amazing film. An boring one too.").text
    'It was an amazing film. A boring one too.'
    """
    known = {m.group(0).lower() for m, _ in _article_mismatches(original)} if original is not None else set()
    out, edits, pos = [], [], 0
    for m, want in _article_mismatches(text):
        if m.group(0).lower() in known:
            continue
        art = m.group(1)
        new = want.upper() if art.isupper() and len(art) > 1 else (want.capitalize() if art[0].isupper() else want)
        out.append(text[pos : m.start(1)])
        out.append(new)
        edits.append(Edit("replace", art, new, m.start(1)))
        pos = m.end(1)
    out.append(text[pos:])
    return EditResult("".join(out), tuple(edits))


# ----------------------------------------------------------------------------------------------
# Clauses: trim whole clauses only, and spot a clause cut mid-way
_CLAUSE_STARTERS = frozenset(
    "the a an i it he she they we you this that these those there my his her their its our your one "
    "nothing everything someone everyone no some each".split())
_CONJUNCTIONS = ("and", "but", "while", "because", "although", "though", "so", "yet", "whereas")
# Words a sentence cannot end on: determiners, prepositions, conjunctions, auxiliaries, pronoun objects-to-be.
_DANGLING = frozenset(
    "the a an and or but nor so yet to of at by for with from into onto about than as which whom "
    "whose where when while because although though if is are was were be been being am has have had do does did "
    "will would can could should shall may might must my your his her their our its very every each "
    "such".split())


_ORPHAN_CONJUNCTION = re.compile(r"\b(?:and|but|or|so|because|while|although)\s*,?\s+[A-Z][a-z]")
_AUXILIARIES = frozenset("is are was were be been am has have had do does did will would can could should shall may "
                         "might must".split())
_SUBJECTS = frozenset("i you he she it we they this that there who what which so".split())


def trim_last_clause(text: str) -> EditResult | None:
    """Drop the last whole sentence, or else the last clause of a single sentence (after a comma, semicolon,
    colon, or a conjunction that starts a new clause: "... delicious and the staff were friendly." ->
    "... delicious."). None when the text is one clause: cutting it would leave it unfinished."""
    spans = sentences(text)
    if len(spans) >= 2:
        s, e = spans[-1]
        return EditResult(text[:s].rstrip() + text[e:], (Edit("delete", text[s:e], "", s),))
    if not spans:
        return None
    s, e = spans[0]
    seg = text[s:e]
    m_end = re.search(r"[.!?]+$", seg)
    body_end = s + (m_end.start() if m_end else len(seg))
    final = m_end.group(0) if m_end else ""
    cuts: list[int] = []
    for m in re.finditer(r"[,;:]\s+", text[s:body_end]):
        cuts.append(s + m.start())
    conj = "|".join(_CONJUNCTIONS)
    for m in re.finditer(rf"\s+(?:{conj})\s+([\w']+)", text[s:body_end], re.I):
        if m.group(1).lower() in _CLAUSE_STARTERS:
            cuts.append(s + m.start())
    for cut in sorted(set(cuts), reverse=True):
        kept = text[:cut].rstrip(" ,;:")
        kept_words = words(kept[s:])
        if len(kept_words) < 3 or len(words(text[cut:body_end])) < 2:
            continue
        if kept_words[-1].strip("\"'()").lower() in _DANGLING:
            continue
        new = kept + (final or ".") + text[e:]
        return EditResult(new, (Edit("delete", text[len(kept):body_end], "", len(kept)),))
    return None


def close_orphaned_conjunctions(text: str, original: str) -> str:
    """After a deletion: a conjunction left before a new sentence ends the clause instead
    ("by mistake, and It is not good." -> "by mistake. It is not good."); matches already in
    ``original`` are left alone."""
    known = {m.group(0) for m in _ORPHAN_CONJUNCTION.finditer(original)}
    return re.sub(r",?\s+(?:and|but|or|so|because|while|although)\s*,?\s+(?=[A-Z][a-z])",
                  lambda m: m.group(0) if any(m.group(0).strip(" ,") in k for k in known) else ". ", text)


def dangling_endings(text: str, original: str | None = None) -> list[str]:
    """Sentences of ``text`` that end on a word a sentence cannot end on ("... the staff were.") or that
    start in lower case after a full stop; those already in ``original`` are excepted."""

    def problems(t: str) -> list[str]:
        out = []
        for k, (s, e) in enumerate(sentences(t)):
            seg = t[s:e].strip()
            ws = [w.strip("\"'()[],;:.!?") for w in words(seg)]
            ws = [w for w in ws if w]
            last = ws[-1].lower() if ws else ""
            prev = ws[-2].lower() if len(ws) > 1 else ""
            # "... the staff were." is cut; "... as it were." / "that is what it was." end whole.
            if seg[-1:] in ".!?" and last in _DANGLING and not (last in _AUXILIARIES and prev in _SUBJECTS):
                out.append(seg)
            elif _ORPHAN_CONJUNCTION.search(seg):  # "... by mistake, and It is not good.": a clause cut out
                out.append(seg)
            elif k > 0 and seg[:1].islower():
                out.append(seg)
        return out

    known = set(problems(original)) if original is not None else set()
    return [p for p in problems(text) if p not in known]
