"""Where comparisons come from: a file or hub dataset, the packaged sample, or generations.

- :func:`load_comparisons`: ``"sample"`` (40 hand-written movie-review comparisons packaged with irm),
  a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file or ``save_to_disk`` directory, or a Hugging
  Face dataset name (e.g. ``"Anthropic/hh-rlhf"``), through :func:`irm.data.load_records`. Data in the
  HH-RLHF layout (no prompt column; ``chosen``/``rejected`` hold the whole dialogue) is split into the
  shared dialogue prefix (the prompt) and the two final assistant turns with ``prompt_field=None``.
- :func:`comparisons_from_pair`: the base and the tuned model answer the same prompts; the explicit
  RM orders each pair (its preferred response becomes ``chosen``); ties are dropped.
- :func:`comparisons_from_model`: two samples of one model (e.g. the base alone) per prompt, ordered
  by the explicit RM.

>>> comps = load_comparisons("sample", limit=30)
>>> comps[0].prompt, comps[0].chosen[:20]
"""

from __future__ import annotations

import csv
import difflib
import json
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from irm.contrastive.explain import Comparison
from irm.core.log import get_logger

__all__ = [
    "SAMPLE",
    "KEYWORD_SOURCES",
    "FILE_SUFFIXES",
    "check_comparisons_source",
    "comparison_columns",
    "load_comparisons",
    "split_hh_dialogue",
    "order_by_rm",
    "comparisons_from_pair",
    "comparisons_from_model",
]

log = get_logger(__name__)

SAMPLE = "sample"
_SAMPLE_RESOURCE = "comparisons_sample.jsonl"
_HH_ASSISTANT = "\n\nAssistant:"


KEYWORD_SOURCES = ("sample",)  # the stage adds "auto", "pair", "base"
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_FIELD_OPTIONS = {"prompt": "prompt_field", "chosen": "chosen_field", "rejected": "rejected_field"}
_SYNONYMS = {  # column names other datasets use for each role, tried before spelling matches
    "prompt": ("prompt", "question", "instruction", "query", "input", "context", "history", "conversation"),
    "chosen": ("chosen", "preferred", "better", "winner", "response_chosen", "chosen_response", "good", "accepted",
               "pos", "positive"),
    "rejected": ("rejected", "dispreferred", "worse", "loser", "response_rejected", "rejected_response", "bad",
                 "neg", "negative"),
}


def _looks_like_file(source: str) -> bool:
    """A local path rather than a hub dataset name: a file suffix, a leading ./ ../ / ~, or 2+ slashes."""
    return (bool(re.search(r"\.[A-Za-z][A-Za-z0-9]{0,7}$", source)) or source.startswith((".", "/", "~"))
            or source.count("/") >= 2 or "\\" in source)


def comparison_columns(path: str | Path) -> list[str] | None:
    """The column names of a local comparisons file, read cheaply (the first rows of a JSONL file, a CSV
    header, a parquet schema); None for a directory or a format whose columns cannot be read this way."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        cols: dict[str, None] = {}
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f):
                if n >= 50:
                    break
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        from irm.data import DataError

                        raise DataError(f"{path}: line {n + 1} is not valid JSON ({e.msg}); a .jsonl file holds "
                                        "one JSON object per line.") from None
                    if isinstance(row, dict):
                        cols.update(dict.fromkeys(row))
        return list(cols)
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return next(csv.reader(f), [])
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, list):
            return list(dict.fromkeys(k for row in data[:50] if isinstance(row, dict) for k in row))
        if isinstance(data, dict):
            return list(data)
        return []
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ModuleNotFoundError:
            return None
        return list(pq.read_schema(path).names)
    return None


def check_comparisons_source(source: str | Path, *, prompt_field: str | None = "prompt",
                             chosen_field: str = "chosen", rejected_field: str = "rejected",
                             base_dir: str | Path | None = None, keywords: Sequence[str] = KEYWORD_SOURCES,
                             cli: bool = False) -> str:
    """Check a comparisons source without loading any model; return it resolved (a path against
    ``base_dir``, e.g. a config file's directory; keywords and hub names as they are).

    A local file must exist, have a known suffix and hold the named columns; the error lists the
    columns present and names the field option that fixes it (``chosen_field='better'``; with
    ``cli=True`` the command-line flag ``--chosen-field better`` too). A hub dataset name is accepted
    as it is (it is only checked when it loads).
    """
    from irm.data import DataError

    src = str(source).strip()
    if not src:
        raise ValueError(f"The comparisons source is empty; use a .jsonl/.csv/.json/.parquet file, a hub dataset "
                         f"or one of {list(keywords)}.")
    if src in keywords:
        return src
    if src == "default":
        raise ValueError("'default' names the packaged prompts, not comparisons; the packaged comparisons are "
                         "'sample' (40 hand-written movie-review comparisons), or give a .jsonl/.csv file.")
    p = Path(src).expanduser()
    if base_dir is not None and not p.is_absolute():
        p = Path(base_dir) / p
    if not p.exists():
        close_kw = difflib.get_close_matches(src.lower(), list(keywords), n=1, cutoff=0.6)
        if not _looks_like_file(src):
            if close_kw:
                raise ValueError(f"Comparisons source {src!r} is not one of {list(keywords)} (did you mean "
                                 f"{close_kw[0]!r}?) nor a local file.")
            return src  # a hub dataset name: checked when it loads
        hint = ""
        parent = p.parent
        if parent.is_dir():
            near = difflib.get_close_matches(p.name, sorted(x.name for x in parent.iterdir()), n=3, cutoff=0.5)
            if near:
                hint = f" Did you mean {', '.join(repr(str(parent / n)) for n in near)}?"
        where = f" (relative to {Path(base_dir).resolve()}, the config file's directory)" if (
            base_dir is not None and not Path(src).expanduser().is_absolute()) else ""
        raise FileNotFoundError(
            f"Comparisons file {src!r} does not exist: {p.resolve()}{where}.{hint} Give a .jsonl/.csv/.json/"
            f".parquet file with prompt, chosen and rejected columns, or 'sample' for the 40 packaged "
            f"movie-review comparisons.")
    if p.is_file() and p.suffix.lower() not in FILE_SUFFIXES:
        close = difflib.get_close_matches(p.suffix.lower(), FILE_SUFFIXES, n=1, cutoff=0.5)
        what = p.suffix or "a file without a suffix"
        raise DataError(f"{p}: comparisons are read from {', '.join(FILE_SUFFIXES)} files, not {what}"
                        + (f" (did you mean {close[0]!r}?)" if close else "") + ".")
    cols = comparison_columns(p) if p.is_file() else None
    if cols is not None:
        if not cols:
            raise DataError(f"{p}: no columns found (an empty file?); it needs prompt, chosen and rejected columns.")
        roles = [("prompt", prompt_field), ("chosen", chosen_field), ("rejected", rejected_field)]
        for role, name in roles:
            if name is None or name in cols:
                continue
            opt = _FIELD_OPTIONS[role]
            flag = "--" + opt.replace("_", "-")
            taken = {n for r, n in roles if r != role and n}
            free = [c for c in cols if c not in taken]
            guess = next((c for syn in _SYNONYMS[role] for c in free if c.lower() == syn), None)
            if guess is None:
                close = difflib.get_close_matches(name, free, n=1, cutoff=0.6)
                guess = close[0] if close else None
            msg = f"{p}: column {name!r} not found for {opt} (the {role} {'text' if role == 'prompt' else 'response'}); "
            msg += f"columns present: {cols}."
            if role == "prompt" and chosen_field in cols and rejected_field in cols and guess is None:
                msg += (f" Without a prompt column, {opt}='' splits HH-RLHF dialogues held whole in "
                        f"{chosen_field!r}/{rejected_field!r}" + (f" ({flag} '' on the command line)." if cli else "."))
            elif guess is not None:
                msg += f" Did you mean {opt}={guess!r}" + (f" ({flag} {guess} on the command line)?" if cli else "?")
            else:
                msg += f" Set {opt} to the column that holds it" + (f" ({flag} COLUMN)." if cli else ".")
            raise DataError(msg)
    return str(p)


def split_hh_dialogue(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two HH-RLHF dialogues into (prompt, chosen reply, rejected reply).

    The prompt is the shared text up to and including the last ``"\\n\\nAssistant:"`` both share.

    >>> split_hh_dialogue("\\n\\nHuman: Hi\\n\\nAssistant: Hello!", "\\n\\nHuman: Hi\\n\\nAssistant: Go away.")
    ('\\n\\nHuman: Hi\\n\\nAssistant:', ' Hello!', ' Go away.')
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(_HH_ASSISTANT, 0, n)
    if cut < 0 or cut + len(_HH_ASSISTANT) > n:
        from irm.data import DataError

        raise DataError(
            "chosen and rejected share no '\\n\\nAssistant:' turn, so the prompt cannot be split off (HH-RLHF layout "
            f"expected); chosen starts {chosen[:60]!r}. Pass prompt_field= with a prompt column instead."
        )
    end = cut + len(_HH_ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def load_comparisons(
    source: str | Path = SAMPLE,
    *,
    prompt_field: str | None = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    split: str = "train",
    limit: int | None = None,
) -> list[Comparison]:
    """Comparisons from ``"sample"``, a local file/directory or a hub dataset (see the module doc).

    ``prompt_field=None`` splits HH-RLHF dialogues (:func:`split_hh_dialogue`).

    >>> load_comparisons("Anthropic/hh-rlhf", prompt_field=None, split="test", limit=30)
    """
    from irm.data import DataError, load_records

    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if str(source) != SAMPLE:  # a missing file or column fails here, with the columns present and a fix
        source = check_comparisons_source(source, prompt_field=prompt_field, chosen_field=chosen_field,
                                          rejected_field=rejected_field)
    if str(source) == SAMPLE:
        text = resources.files("irm.resources").joinpath(_SAMPLE_RESOURCE).read_text(encoding="utf-8")
        rows = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
        comps = [Comparison(r["prompt"], r["chosen"], r["rejected"], id=r.get("id", f"sample-{i}"))
                 for i, r in enumerate(rows)]
        return comps[:limit] if limit else comps
    fields = [chosen_field, rejected_field] + ([prompt_field] if prompt_field else [])
    rows = load_records(source, fields, split=split, limit=limit)
    comps = []
    for i, r in enumerate(rows):
        if prompt_field:
            p, c, rj = r[prompt_field], r[chosen_field], r[rejected_field]
        else:
            p, c, rj = split_hh_dialogue(r[chosen_field], r[rejected_field])
        if c == rj:
            log.warning("Comparison %d of %s has identical chosen and rejected responses; skipped", i, source)
            continue
        comps.append(Comparison(p, c, rj, id=f"{Path(str(source)).stem}-{i}"))
    if not comps:
        raise DataError(f"{source}: no usable comparisons (every row had identical chosen and rejected).")
    return comps


def order_by_rm(prompts: Sequence[str], a: Sequence[str], b: Sequence[str], rm: Any, *, ids: Sequence[str] | None = None,
                limit: int | None = None) -> list[Comparison]:
    """Comparisons of ``a[i]`` vs ``b[i]`` with ``rm``'s preferred response as ``chosen``; ties dropped."""
    if not (len(prompts) == len(a) == len(b)):
        raise ValueError(f"prompts, a and b must have one length, got {len(prompts)}, {len(a)}, {len(b)}")
    from irm.contrastive.explain import tie_margins

    # Rewards equal within rounding are a tie (1.22 vs 1.2200000000000002), not a preference.
    margins = tie_margins(rm.score(list(prompts), list(a)), rm.score(list(prompts), list(b)))
    out = []
    for i, m in enumerate(margins):
        if m == 0 or a[i].strip() == b[i].strip() or not a[i].strip() or not b[i].strip():
            continue
        c, r = (a[i], b[i]) if m > 0 else (b[i], a[i])
        out.append(Comparison(prompts[i], c, r, id=ids[i] if ids else f"gen-{i}"))
        if limit and len(out) >= limit:
            break
    return out


def _generate_until(n: int, prompts: Sequence[str], make: Any) -> list[Comparison]:
    """Call ``make(prompt_chunk, offset)`` on chunks of ``n`` prompts until ``n`` comparisons (or 3 n prompts)."""
    prompts = list(prompts)[: 3 * n]
    if not prompts:
        raise ValueError("No prompts to generate comparisons from.")
    out: list[Comparison] = []
    for start in range(0, len(prompts), n):
        out += make(prompts[start : start + n], start)
        if len(out) >= n:
            break
    return out[:n]


def comparisons_from_pair(pair: Any, prompts: Sequence[str], rm: Any, n: int, *, max_new_tokens: int = 24,
                          temperature: float = 1.0, seed: int = 0, batch_size: int = 32,
                          memo: Any = None) -> list[Comparison]:
    """Base vs tuned responses to the same prompts, ordered by the explicit ``rm`` (ties dropped).

    Prompts are answered ``n`` at a time until ``n`` non-tied comparisons are found (ties are common
    for a lexicon RM on short texts), using at most ``3 n`` prompts. ``memo``: an
    :class:`irm.pair.evaluate.GenerationMemo` (completions of these prompts sampled earlier are continued).
    """
    from irm.core.threads import run_side_by_side
    from irm.models.generation import generate

    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=batch_size, memo=memo)

    def make(chunk: list[str], offset: int) -> list[Comparison]:
        base, tuned = run_side_by_side(  # at the same time on a CPU (irm.core.threads)
            [lambda: generate(pair.base.hf_model, pair.base.tokenizer, chunk, desc="contrastive: base", **kw),
             lambda: generate(pair.tuned.hf_model, pair.tuned.tokenizer, chunk, desc="contrastive: tuned", **kw)],
            [pair.base, pair.tuned])
        return order_by_rm(chunk, base.completions, tuned.completions, rm,
                           ids=[f"pair-{offset + i}" for i in range(len(chunk))])

    return _generate_until(n, prompts, make)


def comparisons_from_model(model: Any, prompts: Sequence[str], rm: Any, n: int, *, max_new_tokens: int = 24,
                           temperature: float = 1.0, seed: int = 0, batch_size: int = 32,
                           memo: Any = None) -> list[Comparison]:
    """Two samples of one model per prompt, ordered by the explicit ``rm`` (ties dropped)."""
    from irm.models.generation import generate

    def make(chunk: list[str], offset: int) -> list[Comparison]:
        g = generate(model.hf_model, model.tokenizer, chunk, n_samples_per_prompt=2, max_new_tokens=max_new_tokens,
                     temperature=temperature, seed=seed + offset, batch_size=batch_size, desc="contrastive: samples",
                     memo=memo)
        return order_by_rm(chunk, g.completions[0::2], g.completions[1::2], rm,
                           ids=[f"model-{offset + i}" for i in range(len(chunk))])

    return _generate_until(n, prompts, make)
