"""Tests for irm.data: loaders for every source kind, their errors, hashing and splitting."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from irm import data
from irm.data import (
    DEFAULT_PROMPTS,
    DataError,
    default_prompts,
    load_records,
    load_texts,
    split_texts,
    texts_hash,
)

TEXTS = ["This movie was", "I rented this film because", "The acting in this"]
PAIRS = [
    {"prompt": "The plot", "chosen": "was gripping.", "rejected": "was dull.", "label": 1},
    {"prompt": "The cast", "chosen": "shines.", "rejected": "mumbles.", "label": 0},
]


@pytest.fixture(autouse=True)
def _isolated_hf(tmp_path, monkeypatch):
    """Keep `datasets` caches inside tmp_path and make hub access fail fast (no network)."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- default prompts


def test_default_prompts_are_many_distinct_short_ascii_openings():
    prompts = default_prompts()
    assert len(prompts) >= 240
    assert len(set(prompts)) == len(prompts), "packaged prompts must be distinct"
    for prompt in prompts:
        assert prompt.isascii() and prompt == prompt.strip(), prompt
        assert 2 <= len(prompt.split()) <= 10, prompt
        assert not prompt.startswith("#"), "the file is pure data, no comment lines"
    assert load_texts(DEFAULT_PROMPTS) == prompts
    assert DEFAULT_PROMPTS == "default"


def test_default_limit_and_records():
    assert load_texts("default", limit=3) == default_prompts()[:3]
    assert load_records("default", ["prompt"], limit=2) == [{"prompt": p} for p in default_prompts()[:2]]
    with pytest.raises(DataError, match="single unnamed column"):
        load_records("default", ["prompt", "chosen"])


# --------------------------------------------------------------------------- file kinds


def test_txt_drops_blank_lines_and_keeps_inner_text(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first line\n\n   \nsecond, with comma\r\nthird\n", encoding="utf-8")
    assert load_texts(path) == ["first line", "second, with comma", "third"]
    # str paths work as well as Path objects
    assert load_texts(str(path), limit=1) == ["first line"]


def test_txt_dedupe_keeps_first_occurrence_then_limits(tmp_path):
    path = tmp_path / "dupes.txt"
    path.write_text("b\na\nb\nc\na\n", encoding="utf-8")
    assert load_texts(path) == ["b", "a", "b", "c", "a"]
    assert load_texts(path, dedupe=True) == ["b", "a", "c"]
    assert load_texts(path, dedupe=True, limit=2) == ["b", "a"]


def test_jsonl_with_custom_text_field(tmp_path):
    path = _write_jsonl(tmp_path / "reviews.jsonl", [{"review": t, "label": i} for i, t in enumerate(TEXTS)])
    assert load_texts(path, text_field="review") == TEXTS


def test_json_array_file(tmp_path):
    path = tmp_path / "reviews.json"
    path.write_text(json.dumps([{"text": t} for t in TEXTS]), encoding="utf-8")
    assert load_texts(path) == TEXTS


def test_csv_file(tmp_path):
    path = tmp_path / "reviews.csv"
    pd.DataFrame({"text": TEXTS, "score": [1.0, 2.0, 3.0]}).to_csv(path, index=False)
    assert load_texts(path) == TEXTS


def test_parquet_file(tmp_path):
    path = tmp_path / "reviews.parquet"
    pd.DataFrame({"text": TEXTS}).to_parquet(path)
    assert load_texts(path, limit=2) == TEXTS[:2]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(single))
    assert load_texts(single) == TEXTS

    both = tmp_path / "dict"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": TEXTS}),
            "test": datasets.Dataset.from_dict({"text": ["held out one"]}),
        }
    ).save_to_disk(str(both))
    assert load_texts(both, split="test") == ["held out one"]
    assert load_texts(both) == TEXTS
    with pytest.raises(DataError, match=r"split 'validation' not found.*\['test', 'train'\]"):
        load_texts(both, split="validation")


def test_load_records_returns_requested_string_fields(tmp_path):
    path = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS + [PAIRS[0]])
    rows = load_records(path, ["prompt", "chosen", "rejected"])
    assert rows[:2] == [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in PAIRS]
    assert len(rows) == 3
    assert load_records(path, ["prompt", "chosen", "rejected"], dedupe=True) == rows[:2]
    assert load_records(path, ("chosen",), limit=1) == [{"chosen": "was gripping."}]


def test_load_records_validates_fields_argument(tmp_path):
    path = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with pytest.raises(TypeError, match="wrap it in a list"):
        load_records(path, "prompt")
    with pytest.raises(ValueError, match="repeated"):
        load_records(path, ["prompt", "prompt"])
    with pytest.raises(
        DataError, match=r"column 'label' of .* 2 non-string value\(s\) of 2; the first is at index 0: int"
    ):
        load_records(path, ["prompt", "label"])


# --------------------------------------------------------------------------- errors


def test_missing_file_reports_resolved_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        load_texts("nope/prompts.jsonl")
    assert str((tmp_path / "nope" / "prompts.jsonl").resolve()) in str(info.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_texts(tmp_path / "missing_dir_without_suffix")
    with pytest.raises(FileNotFoundError):
        load_records("./missing.csv", ["prompt"])


def test_empty_sources_raise(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="no non-blank lines"):
        load_texts(blank)
    header_only = tmp_path / "empty.csv"
    header_only.write_text("text\n", encoding="utf-8")
    with pytest.raises(DataError, match="no rows"):
        load_texts(header_only)
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="no rows"):
        load_texts(empty_jsonl)


def test_missing_text_field_lists_columns_and_suggests_closest(tmp_path):
    path = _write_jsonl(tmp_path / "r.jsonl", [{"review": "fine", "label": 1}])
    with pytest.raises(DataError) as info:
        load_texts(path, text_field="reveiw")
    message = str(info.value)
    assert "'reveiw' not found" in message
    assert "['review', 'label']" in message
    assert "did you mean 'review'" in message
    with pytest.raises(DataError, match="available columns"):
        load_records(path, ["prompt"])


def test_non_string_values_report_count_and_first_index(tmp_path):
    rows = [{"text": "ok"}, {"text": "fine"}, {"text": None}, {"text": "good"}, {"text": None}]
    path = _write_jsonl(tmp_path / "holes.jsonl", rows)
    with pytest.raises(DataError, match=r"2 non-string value\(s\) of 5; the first is at index 2"):
        load_texts(path)


def test_empty_string_values_report_count_and_first_index(tmp_path):
    path = _write_jsonl(tmp_path / "e.jsonl", [{"text": "a"}, {"text": "  "}, {"text": ""}])
    with pytest.raises(
        DataError, match=r"2 empty or whitespace-only value\(s\) of 3; the first is at index 1"
    ):
        load_texts(path)


def test_unsupported_suffix_and_plain_directory(tmp_path):
    odd = tmp_path / "prompts.tsv"
    odd.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type '.tsv'"):
        load_texts(odd)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(DataError, match="not one written by datasets.save_to_disk"):
        load_texts(folder)


def test_bad_limit_rejected():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="limit must be a positive int"):
            load_texts("default", limit=bad)


def test_hub_name_offline_explains_and_chains_cause():
    with pytest.raises(DataError) as info:
        load_texts("someone-irm-test/definitely-not-cached:cfg", split="test")
    message = str(info.value)
    assert "'someone-irm-test/definitely-not-cached'" in message
    assert "config='cfg'" in message and "split='test'" in message
    assert "no network" in message and "local" in message and ".jsonl" in message
    assert info.value.__cause__ is not None  # the original datasets error is chained


def test_hub_loader_receives_name_config_and_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None, **kwargs):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"sentence": ["hub text one", "hub text two"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_texts("org/imdb-like:plain", text_field="sentence", split="test") == [
        "hub text one",
        "hub text two",
    ]
    load_texts("imdb", text_field="sentence")
    assert calls == [("org/imdb-like", "plain", "test"), ("imdb", None, "train")]


# --------------------------------------------------------------------------- hashing


def test_texts_hash_is_pinned_and_stable():
    # Pinned: a change here silently invalidates every cached store keyed by it.
    assert texts_hash(["This movie was", "caf\u00e9"]) == PINNED_HASH
    assert texts_hash(TEXTS) == texts_hash(list(TEXTS)) == texts_hash(tuple(TEXTS))
    assert len(texts_hash([])) == 64


def test_texts_hash_is_sensitive_to_content_order_and_boundaries():
    base = texts_hash(["ab", "c"])
    assert texts_hash(["a", "bc"]) != base  # boundaries are length-prefixed
    assert texts_hash(["c", "ab"]) != base  # order matters
    assert texts_hash(["ab", "d"]) != base  # content matters
    assert texts_hash(["ab", "c", ""]) != base  # an extra empty text matters
    assert texts_hash([]) != texts_hash([""])
    assert texts_hash(["abc"]) != texts_hash(["ab", "c"])


def test_texts_hash_rejects_non_strings():
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        texts_hash(["a", 3])
    with pytest.raises(TypeError, match="wrap it in a list"):
        texts_hash("a single string")


# --------------------------------------------------------------------------- splitting


def test_split_is_deterministic_partition_with_rounded_size():
    texts = [f"t{i}" for i in range(50)]
    train, test = split_texts(texts, test_fraction=0.2, seed=7)
    assert (train, test) == split_texts(texts, test_fraction=0.2, seed=7)
    assert len(test) == 10 and len(train) == 40
    assert sorted(train + test) == sorted(texts)
    assert not set(train) & set(test)
    assert train + test != texts, "the split must shuffle"
    assert split_texts(texts, test_fraction=0.2, seed=8) != (train, test)


def test_split_validates_fraction_and_non_empty_parts():
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            split_texts(["a", "b"], test_fraction=bad, seed=0)
    with pytest.raises(DataError, match="both parts must be non-empty"):
        split_texts(["a", "b", "c"], test_fraction=0.1, seed=0)  # rounds to 0 test texts
    with pytest.raises(DataError, match="both parts must be non-empty"):
        split_texts(["a", "b", "c"], test_fraction=0.9, seed=0)  # rounds to 0 train texts
    with pytest.raises(TypeError, match="seed must be an int"):
        split_texts(["a", "b"], test_fraction=0.5, seed=1.5)


def test_module_docstring_example_holds():
    prompts = load_texts("default", limit=4)
    train, test = split_texts(prompts, test_fraction=0.25, seed=0)
    assert (len(train), len(test)) == (3, 1)
    assert data.DEFAULT_PROMPTS == DEFAULT_PROMPTS


PINNED_HASH = "f7f70cf67c2ad7d06d38b1c8fca5ccb34d3c3e12c1f865fb8a1aa29e0ca5ebe5"
