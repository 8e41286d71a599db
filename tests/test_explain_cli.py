"""``irm explain --rm SPEC ... --comparisons FILE`` (standalone) and ``irm explain CONFIG`` input checks."""

from __future__ import annotations

import json

import pytest

from irm.cli import main


def _write_comparisons(path, n=6, fields=("prompt", "chosen", "rejected")):
    rows = [{fields[0]: "The restaurant", fields[1]: f" was a delight, and the soup was great {i}.",
             fields[2]: f" was a mess, and the soup was awful {i}."} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if any language model loads (input errors must come first)."""
    import irm.models

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(irm.models, "load_model", boom)


def test_standalone_explain_writes_results_report_and_plots(tmp_path, capsys):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from irm.models import build_tiny_tokenizer

    # A tiny classifier RM saved locally, a TSV lexicon, and VADER, side by side.
    base_tok = build_tiny_tokenizer()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
        {w for w in base_tok.get_vocab() if w.isalpha()})) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab))
    clf_dir = tmp_path / "clf"
    BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64, num_labels=1)
                                  ).save_pretrained(clf_dir)
    tok.save_pretrained(clf_dir)
    lex = tmp_path / "words.tsv"
    lex.write_text("great\t2.0\nawful\t-2.0\ndelight\t1.0\n")
    comps = _write_comparisons(tmp_path / "c.jsonl", fields=("question", "better", "worse"))
    out = tmp_path / "out"
    rc = main(["explain", "--rm", "vader", "--rm", str(lex), "--rm", f"classifier:{clf_dir}",
               "--comparisons", str(comps), "--prompt-field", "question", "--chosen-field", "better",
               "--rejected-field", "worse", "--out", str(out), "--no-fluency", "--attributes", "sentiment",
               "verbosity"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "vader / programmatic: CF coverage" in printed and "Results:" in printed
    res = json.loads((out / "results.json").read_text())["contrastive"]
    assert len(res["rms"]) == 3 and res["n_comparisons"] == 6 and res["fields"]["chosen"] == "better"
    assert res["sensitivity"]["vader"]["programmatic"]["top"] == "sentiment"
    assert (out / "contrastive.md").is_file() and (out / "plots" / "contrastive_pfr.png").stat().st_size > 1000


def test_standalone_explain_in_python_with_fluency(tmp_path):
    from irm.contrastive import explain_rms

    comps = _write_comparisons(tmp_path / "c.csv".replace(".csv", ".jsonl"), n=3)
    res, section = explain_rms(["vader"], comps, out=tmp_path / "o", fluency_model="tiny-llama",
                               attributes=["sentiment", "refusal"], n_bootstrap=50)
    f = section["fluency"]
    assert f["model"] == "tiny-llama" and f["n_checked"] > 0 and f["max_perplexity_ratio"] == 2.5
    assert json.loads((tmp_path / "o" / "results.json").read_text())["contrastive"]["fluency"]["n_checked"] > 0


@pytest.mark.parametrize("args, want, not_want", [
    (["--comparisons", "{tmp}/missing.jsonl"], "does not exist", "'default'"),
    (["--comparisons", "{tmp}/c.jsonl", "--chosen-field", "chosen_text"], "chosen_field='chosen'", "text_field"),
    (["--comparisons", "{tmp}/q.jsonl"], "--chosen-field better", "fields="),
    (["--comparisons", "default"], "'sample'", None),
    (["--comparisons", "{tmp}/c.jsonl", "--fluency-model", "smollm2-135m-instrct"], "did you mean "
     "'smollm2-135m-instruct'", None),
])
def test_standalone_explain_checks_inputs_before_loading(tmp_path, capsys, no_model_loads, args, want, not_want):
    _write_comparisons(tmp_path / "c.jsonl")
    _write_comparisons(tmp_path / "q.jsonl", fields=("prompt", "better", "worse"))
    rc = main(["explain", "--rm", "vader", "--out", str(tmp_path / "o")] + [a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert rc == 2 and want in err, err
    assert not_want is None or not_want not in err
    assert not (tmp_path / "o").exists()


def test_rm_spec_typo_fails_before_anything_loads(tmp_path, capsys, no_model_loads):
    rc = main(["explain", "--rm", "vadr", "--comparisons", "sample", "--out", str(tmp_path / "o")])
    assert rc == 2 and "RM spec 'vadr'" in capsys.readouterr().err


def test_config_and_rm_flags_do_not_mix(tmp_path, capsys):
    assert main(["explain", "experiments/tiny.toml", "--rm", "vader"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["explain"]) == 2
    assert "--rm" in capsys.readouterr().err


def test_config_source_resolves_against_the_config_file(tmp_path, monkeypatch):
    from irm.contrastive.stage import check_contrastive_config, resolve_source
    from irm.run.config import ConfigError, load_config

    cdir = tmp_path / "exp"
    cdir.mkdir()
    _write_comparisons(cdir / "comps.jsonl")
    (cdir / "e.toml").write_text('[contrastive]\nsource = "comps.jsonl"\n')
    monkeypatch.chdir(tmp_path)  # the working directory is elsewhere
    cfg = load_config(cdir / "e.toml")
    check_contrastive_config(cfg)
    assert resolve_source(cfg.section("contrastive"), cfg.source) == str((cdir / "comps.jsonl").resolve())
    (cdir / "bad.toml").write_text('[contrastive]\nsource = "comps.jsnol"\n')
    with pytest.raises(ConfigError, match="did you mean '.jsonl'"):
        load_config(cdir / "bad.toml")  # a suffix typo fails at config load
    (cdir / "typo.toml").write_text('[contrastive]\nsource = "sampel"\n')
    with pytest.raises(ConfigError, match="did you mean 'sample'"):
        load_config(cdir / "typo.toml")
    (cdir / "missing.toml").write_text('[contrastive]\nsource = "comp.jsonl"\n')
    cfg = load_config(cdir / "missing.toml")
    with pytest.raises(ConfigError, match="comps.jsonl") as e:
        check_contrastive_config(cfg)
    assert "config file's directory" in str(e.value) and "'default'" not in str(e.value)


def test_explain_config_fails_on_a_missing_file_before_any_stage(tmp_path, capsys, monkeypatch):
    import irm.run.pipeline

    def boom(*a, **k):
        raise AssertionError("a stage ran before the comparisons file was checked")

    monkeypatch.setattr(irm.run.pipeline, "run_experiment", boom)
    (tmp_path / "e.toml").write_text('[contrastive]\nsource = "nowhere.jsonl"\n')
    assert main(["explain", str(tmp_path / "e.toml")]) == 2
    err = capsys.readouterr().err
    assert "nowhere.jsonl" in err and "does not exist" in err
