"""Loading, hashing and splitting the text data that experiments run on.

Every experiment reads its prompts or comparisons through :func:`load_texts`
or :func:`load_records`, so one set of loaders and one set of checks covers
local files, datasets saved with ``datasets.save_to_disk`` and Hugging Face
hub datasets.

The packaged default prompts (``irm/resources/movie_review_openings.txt``)
are short movie-review openings in the style of the IMDB prompts used in
RLHF sentiment experiments. They were written by hand for this project (no
text was copied from IMDB or any other review site) and are released with
the project's license.

Example:
    >>> from irm.data import load_texts, split_texts, texts_hash
    >>> prompts = load_texts("default", limit=4)
    >>> train, test = split_texts(prompts, test_fraction=0.25, seed=0)
    >>> len(train), len(test), len(texts_hash(prompts))
    (3, 1, 64)
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_PROMPTS",
    "DataError",
    "default_prompts",
    "load_records",
    "load_texts",
    "split_texts",
    "texts_hash",
]

DEFAULT_PROMPTS = "default"
"""Source name that selects the packaged movie-review openings."""

_PROMPTS_RESOURCE = "movie_review_openings.txt"

# Suffixes handed to the matching generic `datasets` builder.
_DATASETS_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
_LOCAL_SUFFIXES = (".txt", *_DATASETS_BUILDERS)

# Files `datasets.save_to_disk` writes: a Dataset has state.json and
# dataset_info.json, a DatasetDict has dataset_dict.json.
_SAVE_TO_DISK_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")


class DataError(ValueError):
    """A data source could be read but its contents are unusable.

    Example:
        >>> try:
        ...     split_texts(["only one"], test_fraction=0.5, seed=0)
        ... except DataError as err:
        ...     print(type(err).__name__)
        DataError
    """


def default_prompts() -> list[str]:
    """Return the packaged movie-review openings, in file order.

    Example:
        >>> prompts = default_prompts()
        >>> len(prompts) >= 240 and prompts[0]
        'This movie was'
    """
    text = resources.files("irm.resources").joinpath(_PROMPTS_RESOURCE).read_text(encoding="utf-8")
    return _nonblank_lines(text)


def load_texts(
    source: str | Path,
    *,
    text_field: str = "text",
    split: str = "train",
    limit: int | None = None,
    dedupe: bool = False,
) -> list[str]:
    """Load a list of non-empty strings from ``source``.

    ``source`` may be:

    * ``"default"``: the packaged prompts (:func:`default_prompts`);
    * ``"human:CORPORA[:N]"``: openings (first ``N`` words, default 5) of the human-rated corpora's train
      texts, e.g. ``"human:movies,amazon,nyt"`` (:func:`irm.data.human.corpus_openings`): 100 of each
      corpus, or as many as ``limit`` needs when it asks for more;
    * a local ``.txt`` file: one text per line, blank lines dropped;
    * a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file, read with
      ``datasets.load_dataset`` and column ``text_field``;
    * a local directory written by ``datasets.save_to_disk`` (a
      ``DatasetDict`` is indexed with ``split``);
    * anything else: a Hugging Face hub dataset ``"name"`` or
      ``"name:config"``, loaded with ``split``.

    ``dedupe`` drops repeated texts (keeping the first); ``limit`` then keeps
    the first ``limit`` texts.

    Example:
        >>> load_texts("default", limit=2)
        ['This movie was', 'I rented this film because']
    """
    _check_limit(limit)
    if _is_default(source):
        texts = default_prompts()
    elif isinstance(source, str) and source.startswith("human:"):
        from irm.data.human import corpus_openings, parse_openings_source

        names, n_words = parse_openings_source(source)
        # 100 openings per corpus, or as many as the limit asks for (it takes the corpora in turn).
        per_corpus = max(100, -(-limit // len(names))) if limit is not None else 100
        texts = corpus_openings(names, n_words=n_words, per_corpus=per_corpus)
    else:
        path = _local_path(source)
        if path is not None and path.suffix.lower() == ".txt":
            texts = _read_txt(path)
        else:
            dataset = _load_dataset(source, path, split=split)
            columns = _select_columns(dataset, [text_field], source)
            texts = columns[text_field]
    _check_strings(texts, field=text_field, source=source)
    if dedupe:
        texts = list(dict.fromkeys(texts))
    return texts if limit is None else texts[:limit]


def load_records(
    source: str | Path,
    fields: Sequence[str],
    *,
    split: str = "train",
    limit: int | None = None,
    dedupe: bool = False,
) -> list[dict[str, str]]:
    """Load rows holding the string columns ``fields`` from ``source``.

    Accepts the same sources as :func:`load_texts` (a ``.txt`` file or
    ``"default"`` only when a single field is requested, since they have one
    unnamed column). Every requested value must be a non-empty string.
    ``dedupe`` drops rows whose requested values repeat an earlier row.

    Example:
        >>> rows = load_records("default", ["prompt"], limit=1)
        >>> rows
        [{'prompt': 'This movie was'}]
    """
    if isinstance(fields, str):
        raise TypeError(
            f"fields must be a sequence of column names, got the string {fields!r}; "
            f"wrap it in a list: fields=[{fields!r}]"
        )
    fields = list(fields)
    if not fields:
        raise ValueError("fields is empty; pass the columns to load, e.g. ['prompt', 'chosen', 'rejected']")
    if len(set(fields)) != len(fields):
        raise ValueError(f"fields has repeated names: {fields}; list each column once")
    _check_limit(limit)

    path = None if _is_default(source) else _local_path(source)
    if _is_default(source) or (path is not None and path.suffix.lower() == ".txt"):
        if len(fields) != 1:
            raise DataError(
                f"{source!s} has a single unnamed column (one text per line) but {len(fields)} "
                f"fields were requested: {fields}; use a .jsonl/.csv/.parquet file with those columns"
            )
        texts = default_prompts() if path is None else _read_txt(path)
        columns = {fields[0]: texts}
    else:
        dataset = _load_dataset(source, path, split=split)
        columns = _select_columns(dataset, fields, source)
    for name in fields:
        _check_strings(columns[name], field=name, source=source)

    rows = [dict(zip(fields, values)) for values in zip(*(columns[name] for name in fields))]
    if dedupe:
        seen: set[tuple[str, ...]] = set()
        unique = []
        for row in rows:
            key = tuple(row[name] for name in fields)
            if key not in seen:
                seen.add(key)
                unique.append(row)
        rows = unique
    return rows if limit is None else rows[:limit]


def texts_hash(texts: Sequence[str]) -> str:
    """Return a sha256 hex digest identifying the exact sequence ``texts``.

    Each text is length-prefixed, so ``["ab", "c"]`` and ``["a", "bc"]`` hash
    differently; the digest depends only on the texts and their order, so it
    is stable across runs, machines and Python versions.

    Example:
        >>> texts_hash(["ab", "c"]) == texts_hash(["a", "bc"])
        False
    """
    if isinstance(texts, str):
        raise TypeError(
            f"texts must be a sequence of strings, got the string {texts[:40]!r}; wrap it in a list"
        )
    digest = hashlib.sha256()
    # Versioned domain tag and count: changing the scheme later cannot
    # collide with old digests, and a prefix of a list differs from the list.
    digest.update(b"irm.texts_hash.v1\0")
    digest.update(len(texts).to_bytes(8, "big"))
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(
                f"texts[{index}] is {type(text).__name__}, expected str; convert or drop non-string entries"
            )
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "big"))
        digest.update(encoded)
    return digest.hexdigest()


def split_texts(texts: Sequence[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle ``texts`` with ``seed`` and split them into ``(train, test)``.

    The test part holds ``round(len(texts) * test_fraction)`` texts. The same
    texts, fraction and seed always give the same split (numpy
    ``default_rng``); both parts keep the shuffled order.

    Example:
        >>> train, test = split_texts(["a", "b", "c", "d"], test_fraction=0.5, seed=1)
        >>> sorted(train + test)
        ['a', 'b', 'c', 'd']
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise TypeError(f"test_fraction must be a float in (0, 1), got {type(test_fraction).__name__}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            f"test_fraction must be strictly between 0 and 1, got {test_fraction}; e.g. test_fraction=0.2"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    texts = list(texts)
    n_total = len(texts)
    n_test = int(round(n_total * test_fraction))
    if n_test == 0 or n_test == n_total:
        raise DataError(
            f"splitting {n_total} texts with test_fraction={test_fraction} gives {n_test} test and "
            f"{n_total - n_test} train texts; both parts must be non-empty, so use more texts or a "
            f"test_fraction between {1 / max(n_total, 1):.3g} and {1 - 1 / max(n_total, 1):.3g}"
        )
    order = np.random.default_rng(seed).permutation(n_total)
    test = [texts[i] for i in order[:n_test]]
    train = [texts[i] for i in order[n_test:]]
    return train, test


# --------------------------------------------------------------------------- helpers


def _is_default(source: str | Path) -> bool:
    return isinstance(source, str) and source == DEFAULT_PROMPTS


def _nonblank_lines(text: str) -> list[str]:
    # Only the line break is removed: leading/trailing spaces inside a prompt
    # change its tokenization, so they are the file author's decision.
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def _local_path(source: str | Path) -> Path | None:
    """Return the local path ``source`` names, or None for a hub dataset name.

    Raises FileNotFoundError for something that is clearly meant as a local
    path (a Path, a known file suffix, an explicit ./ ../ / ~ prefix) but does
    not exist, instead of sending it to the hub.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"source must be a str or Path, got {type(source).__name__}; pass 'default', a file path or a "
            "Hugging Face dataset name"
        )
    raw = os.fspath(source)
    if not raw:
        raise ValueError(
            "source is an empty string; pass 'default', a file path or a Hugging Face dataset name"
        )
    path = Path(raw).expanduser()
    if path.exists():
        return path
    looks_local = (
        isinstance(source, os.PathLike)
        or path.suffix.lower() in _LOCAL_SUFFIXES
        or raw.startswith(("./", "../", "/", "~", ".\\", "..\\"))
    )
    if looks_local:
        raise FileNotFoundError(
            f"data file not found: {path.resolve()} (from source={raw!r}); check the path, or pass "
            f"{DEFAULT_PROMPTS!r} for the packaged prompts"
        )
    return None


def _read_txt(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path.resolve()} is not valid UTF-8 ({err}); re-save it as UTF-8 text") from err
    texts = _nonblank_lines(text)
    if not texts:
        raise DataError(f"{path.resolve()} has no non-blank lines; put one text per line")
    return texts


def _load_dataset(source: str | Path, path: Path | None, *, split: str) -> Any:
    """Load ``source`` as a ``datasets.Dataset`` (never a DatasetDict)."""
    import datasets  # imported lazily: it takes about a second

    if path is not None:
        if path.is_dir():
            if not any((path / marker).exists() for marker in _SAVE_TO_DISK_MARKERS):
                raise DataError(
                    f"{path.resolve()} is a directory but not one written by datasets.save_to_disk "
                    f"(none of {', '.join(_SAVE_TO_DISK_MARKERS)} found); pass a .txt/.jsonl/.json/.csv/"
                    ".parquet file instead"
                )
            loaded = datasets.load_from_disk(str(path))
            dataset = _pick_split(loaded, split, source)
        else:
            builder = _DATASETS_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(
                    f"unsupported file type {path.suffix!r} for {path.resolve()}; valid suffixes are "
                    f"{', '.join(_LOCAL_SUFFIXES)}; convert the file or rename it if the suffix is wrong"
                )
            if path.stat().st_size < 65536 and not path.read_bytes().strip():
                raise DataError(f"{path.resolve()} is empty (no rows); add data to the file")
            try:
                # A local file always becomes a single "train" split; `split`
                # only selects among the splits of hub or save_to_disk data.
                dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
            except Exception as err:  # datasets raises many types for bad files
                if "corresponds to no data" in str(err):
                    # datasets' wording for a file with a header but no rows
                    raise DataError(f"{path.resolve()} has no rows; add data rows to the file") from err
                raise DataError(
                    f"could not parse {path.resolve()} as {builder} ({type(err).__name__}: {err}); "
                    f"check that the file is valid {builder}"
                    + (" with one JSON object per line" if builder == "json" else "")
                ) from err
    else:
        name, _, config = str(source).partition(":")
        try:
            dataset = datasets.load_dataset(name, config or None, split=split)
        except Exception as err:
            raise DataError(
                f"could not load Hugging Face hub dataset {name!r} (config={config or None!r}, "
                f"split={split!r}): {type(err).__name__}: {err}. If the name is right, no network "
                "connection or local HF cache copy of it was available (set HF_HUB_OFFLINE=1 to fail "
                "fast instead of retrying). To work offline, save it once where there is network "
                "(load_dataset(...).save_to_disk('DIR') or .to_json('FILE.jsonl')) and pass that "
                "directory or file as the source, or pass a local .txt/.jsonl/.csv/.parquet file"
            ) from err
    if len(dataset) == 0:
        raise DataError(f"dataset {source!s} (split={split!r}) has no rows; check the source and split")
    return dataset


def _pick_split(loaded: Any, split: str, source: str | Path) -> Any:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"split {split!r} not found in {source!s}; available splits: {sorted(loaded)}; "
                "pass one of them as split="
            )
        return loaded[split]
    return loaded


def _select_columns(dataset: Any, fields: Sequence[str], source: str | Path) -> dict[str, list[Any]]:
    available = list(dataset.column_names)
    for field in fields:
        if field not in available:
            close = difflib.get_close_matches(field, available, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise DataError(
                f"column {field!r} not found in {source!s}; available columns: {available}; "
                f"{hint}pass the right name (text_field= for load_texts, fields= for load_records)"
            )
    # list(...) materializes datasets' lazy Column objects into plain lists.
    return {field: list(dataset[field]) for field in fields}


def _check_strings(values: Sequence[Any], *, field: str, source: str | Path) -> None:
    if not values:
        raise DataError(f"{source!s} has no rows; check the source")
    non_string = [i for i, value in enumerate(values) if not isinstance(value, str)]
    if non_string:
        first = non_string[0]
        raise DataError(
            f"column {field!r} of {source!s} has {len(non_string)} non-string value(s) of {len(values)}; "
            f"the first is at index {first}: {type(values[first]).__name__} {str(values[first])[:80]!r}. "
            "Every value must be a string: clean the data or pick a text column"
        )
    empty = [i for i, value in enumerate(values) if not value.strip()]
    if empty:
        raise DataError(
            f"column {field!r} of {source!s} has {len(empty)} empty or whitespace-only value(s) of "
            f"{len(values)}; the first is at index {empty[0]}. Drop those rows before loading"
        )


def _check_limit(limit: int | None) -> None:
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive int or None, got {limit!r}; e.g. limit=100")
