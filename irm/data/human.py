"""The VADER authors' human-rated gold standard (Hutto & Gilbert, ICWSM 2014), and preference pairs from it.

Four corpora of short texts, each rated by about 20 humans (15 to 99 ratings a text) on -4 (extremely
negative) .. +4 (extremely positive); the mean rating is the gold standard:

=========  ======  ====================================================
corpus     texts   what
=========  ======  ====================================================
tweets      4,200  tweets
movies     10,605  movie-review snippets (Pang & Lee's sentence polarity data)
amazon      3,708  Amazon product-review snippets
nyt         5,190  New York Times opinion-editorial snippets
=========  ======  ====================================================

They ship, MIT-licensed, inside the *source distribution* of ``vaderSentiment==3.3.2`` (the wheel does not
have them): ``additional_resources/hutto_ICWSM_2014.tar.gz``. :func:`fetch_human_data` (``python -m
irm.data.human``, run by ``make dev``) downloads that sdist once with pip into ``$IRM_CACHE_DIR/data`` and
checks its sha256; nothing is extracted: the files are read straight out of the archive.

Every text has a fixed split (train 70%, validation 10%, test 20%) from a hash of its corpus and id, so the
split never depends on the order of loading, on a seed or on which other corpora are loaded.

>>> from irm.data.human import load_human_corpus, preference_pairs
>>> tweets = load_human_corpus("tweets")
>>> len(tweets), tweets.texts[1], round(float(tweets.means[1]), 2)
(4200, 'Yay. Another good phone interview.', 1.44)
>>> test = tweets.subset("test")
>>> pairs = preference_pairs([tweets], split="train", margin=1.0, pairs_per_corpus=100, seed=0)
>>> sorted(pairs[0])
['chosen', 'chosen_id', 'corpus', 'margin', 'prompt', 'rejected', 'rejected_id']
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from irm.core.constants import ENV_CACHE_DIR
from irm.core.io import file_sha256

__all__ = [
    "CORPORA",
    "INSTRUCTIONS",
    "SPLITS",
    "SDIST_REQUIREMENT",
    "SDIST_SHA256",
    "FETCH_COMMAND",
    "HumanCorpus",
    "HumanDataMissing",
    "corpus_openings",
    "OPENINGS_PREFIX",
    "fetch_human_data",
    "human_data_path",
    "load_human_corpus",
    "load_human_corpora",
    "preference_pairs",
    "split_of",
]

SDIST_REQUIREMENT = "vaderSentiment==3.3.2"
SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
_INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
FETCH_COMMAND = "make human-data   (or: .venv/bin/python -m irm.data.human)"

#: corpus name -> file prefix in the archive
CORPORA: dict[str, str] = {
    "tweets": "tweets",
    "movies": "movieReviewSnippets",
    "amazon": "amazonReviewSnippets",
    "nyt": "nytEditorialSnippets",
}
_EXPECTED_SIZES = {"tweets": 4200, "movies": 10605, "amazon": 3708, "nyt": 5190}

#: The prompt of a corpus where a (prompt, response) RM needs one: what the text is a response to.
INSTRUCTIONS: dict[str, str] = {
    "tweets": "Write a tweet.\n",
    "movies": "Write a sentence from a movie review.\n",
    "amazon": "Write a sentence from a product review.\n",
    "nyt": "Write a sentence from a newspaper editorial.\n",
}

SPLITS = ("train", "validation", "test")
_SPLIT_BOUNDS = (0.7, 0.8)  # hash fraction < 0.7: train, < 0.8: validation, else test


class HumanDataMissing(FileNotFoundError):
    """The gold-standard archive is not in the cache; the message says the one command that fetches it."""


def _cache_root() -> Path:
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("irm"))


def human_data_path() -> Path:
    """Where the verified ``vaderSentiment`` sdist lives: ``$IRM_CACHE_DIR/data/vaderSentiment-3.3.2.tar.gz``."""
    return _cache_root() / "data" / SDIST_NAME


def fetch_human_data(*, force: bool = False, quiet: bool = False) -> Path:
    """Download the ``vaderSentiment==3.3.2`` sdist with pip (from PyPI, or the index pip is configured
    with) into the cache once, check its sha256 and return its path; an existing verified copy is kept."""
    out = human_data_path()
    if out.is_file() and not force:
        if file_sha256(out) == SDIST_SHA256:
            return out
        out.unlink()  # a corrupt or truncated copy: fetch again
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, SDIST_REQUIREMENT]
        if quiet:
            cmd.insert(4, "-q")
        done = subprocess.run(cmd, capture_output=quiet, text=True)
        got = Path(tmp) / SDIST_NAME
        if done.returncode != 0 or not got.is_file():
            detail = (done.stderr or "")[-2000:] if quiet else "see pip's output above"
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {done.returncode}): {detail}. It needs PyPI (or a "
                               f"configured index) to be reachable; or put {SDIST_NAME} (sha256 {SDIST_SHA256}) "
                               f"at {out} by hand.")
        sha = file_sha256(got)
        if sha != SDIST_SHA256:
            raise RuntimeError(f"{SDIST_NAME} from pip has sha256 {sha}, expected {SDIST_SHA256}: the index served "
                               "a different file; not using it.")
        shutil.move(str(got), out)
    return out


def _archive_path(path: str | Path | None) -> Path:
    p = Path(path) if path is not None else human_data_path()
    if not p.is_file():
        raise HumanDataMissing(f"The human-rated gold standard (the {SDIST_REQUIREMENT} sdist) is not at {p}. "
                               f"Fetch it once with: {FETCH_COMMAND}")
    return p


@functools.lru_cache(maxsize=2)
def _archive_files(path: str, mtime_ns: int) -> dict[str, bytes]:
    """The gold-standard files, read from the inner archive of the sdist: name -> bytes."""
    with tarfile.open(path, "r:gz") as outer:
        try:
            member = outer.extractfile(_INNER_ARCHIVE)
        except KeyError:
            member = None
        if member is None:
            raise ValueError(f"{path} holds no {_INNER_ARCHIVE}; is it the {SDIST_REQUIREMENT} sdist? Delete it "
                             f"and fetch again: {FETCH_COMMAND}")
        inner_bytes = member.read()
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        for m in inner.getmembers():
            name = m.name.rsplit("/", 1)[-1]
            if m.isfile() and name.endswith(("_GroundTruth.txt", "_anonDataRatings.txt")):
                f = inner.extractfile(m)
                assert f is not None
                files[name] = f.read()
    return files


def _lines(raw: bytes) -> list[str]:
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark on one file
        raw = raw[3:]
    return [line for line in raw.decode("latin-1").splitlines() if line.strip()]


@dataclass(frozen=True)
class HumanCorpus:
    """One corpus: ``texts[i]`` rated ``means[i]`` on -4..+4 (the mean of ``ratings[i]``), in split ``splits[i]``."""

    name: str
    ids: tuple[str, ...]
    texts: tuple[str, ...]
    means: np.ndarray  # float64 [n]
    ratings: tuple[np.ndarray, ...]  # the individual human ratings of each text (int, 15 to 99 each)
    splits: np.ndarray  # str [n]: train / validation / test

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def instruction(self) -> str:
        return INSTRUCTIONS[self.name]

    def subset(self, split: str) -> HumanCorpus:
        """The texts of one split (``train``, ``validation`` or ``test``)."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}.")
        idx = np.flatnonzero(self.splits == split)
        return HumanCorpus(self.name, tuple(self.ids[i] for i in idx), tuple(self.texts[i] for i in idx),
                           self.means[idx], tuple(self.ratings[i] for i in idx), self.splits[idx])


def split_of(corpus: str, text_id: str) -> str:
    """The fixed split of one text: a hash of ``corpus:id``, so it never depends on loading order or seeds."""
    h = int.from_bytes(hashlib.sha256(f"{corpus}:{text_id}".encode()).digest()[:8], "big") / 2.0**64
    return "train" if h < _SPLIT_BOUNDS[0] else "validation" if h < _SPLIT_BOUNDS[1] else "test"


def _check_corpus_name(name: str) -> None:
    if name not in CORPORA:
        raise ValueError(f"Unknown human-rated corpus {name!r}; the corpora are {list(CORPORA)}.")


def load_human_corpus(name: str, *, path: str | Path | None = None) -> HumanCorpus:
    """Load one corpus (``tweets``, ``movies``, ``amazon`` or ``nyt``) from the cached sdist (or ``path``).

    Raises :class:`HumanDataMissing` naming the fetch command when the archive is not there."""
    _check_corpus_name(name)
    p = _archive_path(path)
    return _load(name, str(p.resolve()), p.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _load(name: str, path: str, mtime_ns: int) -> HumanCorpus:
    files = _archive_files(path, mtime_ns)
    prefix = CORPORA[name]
    gt_name, rt_name = f"{prefix}_GroundTruth.txt", f"{prefix}_anonDataRatings.txt"
    for f in (gt_name, rt_name):
        if f not in files:
            raise ValueError(f"{path}: the gold-standard archive has no {f}; delete it and fetch again: {FETCH_COMMAND}")
    ids, texts, means = [], [], []
    for k, line in enumerate(_lines(files[gt_name]), 1):
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise ValueError(f"{gt_name} line {k}: expected 'id<TAB>mean<TAB>text', got {line[:80]!r}")
        ids.append(parts[0].strip())
        means.append(float(parts[1]))
        texts.append(parts[2].strip())
    ratings: dict[str, np.ndarray] = {}
    for k, line in enumerate(_lines(files[rt_name]), 1):
        parts = line.split("\t")
        if len(parts) != 4:
            raise ValueError(f"{rt_name} line {k}: expected 'id<TAB>mean<TAB>sd<TAB>[ratings]', got {line[:80]!r}")
        ratings[parts[0].strip()] = np.array([int(x) for x in parts[3].strip().strip("[]").split(",")], dtype=np.int64)
    if len(ids) != _EXPECTED_SIZES[name] or len(set(ids)) != len(ids):
        raise ValueError(f"{gt_name}: read {len(ids)} texts ({len(set(ids))} distinct ids), expected "
                         f"{_EXPECTED_SIZES[name]}: the archive is not the published one.")
    missing = [i for i in ids if i not in ratings]
    if missing:
        raise ValueError(f"{rt_name} has no ratings for {len(missing)} texts (first: id {missing[0]}).")
    m = np.asarray(means, dtype=np.float64)
    per_text = tuple(ratings[i] for i in ids)
    # The published files disagree on 199 tweets: their ratings file holds more ratings (up to 99) than the
    # gold-standard mean was computed from. The gold-standard mean is what the paper (and VADER's r = 0.881)
    # uses, so it is the target here; the individual ratings are kept as published.
    splits = np.array([split_of(name, i) for i in ids])
    return HumanCorpus(name, tuple(ids), tuple(texts), m, per_text, splits)


def load_human_corpora(names: Sequence[str] | None = None, *, path: str | Path | None = None) -> list[HumanCorpus]:
    """Several corpora (default: all four, in :data:`CORPORA` order)."""
    names = list(CORPORA) if names is None else list(names)
    if not names:
        raise ValueError(f"No corpus named; pick from {list(CORPORA)}.")
    for n in names:
        _check_corpus_name(n)
    return [load_human_corpus(n, path=path) for n in names]


def preference_pairs(corpora: Sequence[HumanCorpus], *, split: str = "train", margin: float = 0.5,
                     pairs_per_corpus: int = 1000, seed: int = 0) -> list[dict]:
    """Preference pairs from the human ratings: two texts of the same corpus and split whose mean ratings
    differ by at least ``margin``; ``chosen`` is the higher-rated one. Each pair carries its corpus's
    instruction as ``prompt`` (used where an RM needs one), its ``corpus``, the texts' ids and the rating
    difference ``margin``. Up to ``pairs_per_corpus`` distinct pairs per corpus, drawn uniformly with ``seed``."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0 (a difference of mean ratings on -4..+4), got {margin}.")
    if pairs_per_corpus < 1:
        raise ValueError(f"pairs_per_corpus must be >= 1, got {pairs_per_corpus}.")
    rng = np.random.default_rng(seed)
    out: list[dict] = []
    for corpus in corpora:
        c = corpus.subset(split)
        n = len(c)
        if n < 2:
            raise ValueError(f"{corpus.name}/{split} has {n} text(s); no pairs can be made.")
        seen: set[tuple[int, int]] = set()
        chosen: list[tuple[int, int]] = []
        for _ in range(50):  # rounds of candidate draws; stops early once enough pairs are found
            a = rng.integers(0, n, size=4 * pairs_per_corpus)
            b = rng.integers(0, n, size=4 * pairs_per_corpus)
            for i, j in zip(a.tolist(), b.tolist(), strict=True):
                if i == j or abs(c.means[i] - c.means[j]) < margin or (min(i, j), max(i, j)) in seen:
                    continue
                if c.means[i] == c.means[j]:
                    continue
                seen.add((min(i, j), max(i, j)))
                chosen.append((i, j) if c.means[i] > c.means[j] else (j, i))
                if len(chosen) == pairs_per_corpus:
                    break
            if len(chosen) == pairs_per_corpus:
                break
        if not chosen:
            raise ValueError(f"{corpus.name}/{split}: no two texts differ by margin {margin}; lower the margin.")
        out += [{"prompt": c.instruction, "chosen": c.texts[i], "rejected": c.texts[j], "corpus": c.name,
                 "chosen_id": c.ids[i], "rejected_id": c.ids[j], "margin": float(c.means[i] - c.means[j])}
                for i, j in chosen]
    return out


if __name__ == "__main__":  # python -m irm.data.human: fetch and verify the archive once
    path = fetch_human_data()
    sizes = {c.name: len(c) for c in load_human_corpora()}
    print(f"{path}  (sha256 ok; {sizes})")


OPENINGS_PREFIX = "human:"
"""``load_texts("human:movies,amazon")`` (optionally ``":N"`` words): openings of the corpora's train texts."""


def corpus_openings(names: Sequence[str] | None = None, *, n_words: int = 5, per_corpus: int = 100,
                    split: str = "train", path: str | Path | None = None) -> list[str]:
    """Prompts from the human-rated corpora: the first ``n_words`` words of up to ``per_corpus`` texts of
    each corpus's ``split`` that have at least ``n_words + 3`` words, so a model writes the rest.

    The texts are taken in the order of a hash of their ids (fixed: no seed, no loading order), the
    corpora in turn (so a limit keeps them balanced), and repeated openings are dropped. The train split by default: the humans'
    ratings of the test split stay unseen by anything tuned on these prompts.

    >>> corpus_openings(["movies"], n_words=4, per_corpus=2)
    """
    if n_words < 1 or per_corpus < 1:
        raise ValueError(f"n_words and per_corpus must be >= 1, got {n_words} and {per_corpus}")
    per: list[list[str]] = []
    for c in load_human_corpora(names, path=path):
        sub = c.subset(split)
        order = sorted(range(len(sub)), key=lambda i: hashlib.sha256(f"{c.name}:{sub.ids[i]}:opening".encode()).digest())
        mine: dict[str, None] = {}
        for i in order:
            words = sub.texts[i].split()
            if len(words) >= n_words + 3:
                mine.setdefault(" ".join(words[:n_words]), None)
            if len(mine) >= per_corpus:
                break
        per.append(list(mine))
    # Round robin over the corpora, so that a limit keeps them balanced.
    out: dict[str, None] = {}
    for k in range(max((len(x) for x in per), default=0)):
        for x in per:
            if k < len(x):
                out.setdefault(x[k], None)
    return list(out)


def parse_openings_source(source: str) -> tuple[list[str], int]:
    """``"human:movies,amazon:6"`` -> (["movies", "amazon"], 6); ``"human:"`` or ``"human:all"``: every corpus."""
    body = source[len(OPENINGS_PREFIX):]
    names_s, _, n_s = body.partition(":")
    names = [x.strip() for x in names_s.split(",") if x.strip()] if names_s.strip() not in ("", "all") else list(CORPORA)
    for n in names:
        _check_corpus_name(n)
    try:
        n_words = int(n_s) if n_s.strip() else 5
    except ValueError:
        raise ValueError(f"{source!r}: the part after the corpora is a number of words, e.g. 'human:movies,nyt:5'") from None
    return names, n_words
