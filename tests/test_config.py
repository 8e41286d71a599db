from __future__ import annotations

from pathlib import Path

import pytest

from irm.run.config import ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["default", "tiny"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "experiments" / f"{name}.toml")
    assert cfg.name == name
    assert cfg.reward.build().name == "vader"
    d = cfg.to_dict()
    assert d["models"]["base"] == cfg.models.base and d["source"].endswith(f"{name}.toml")


def test_typos_are_errors_with_suggestions():
    with pytest.raises(ConfigError, match="unknown key\\(s\\) 'batchsize' \\(did you mean 'batch_size'\\?\\)"):
        config_from_dict({"capture": {"batchsize": 8}})
    with pytest.raises(ConfigError, match="'captur' \\(did you mean 'capture'\\?\\)"):
        config_from_dict({"captur": {}})
    with pytest.raises(ConfigError, match="positions 'first' is not one of"):
        config_from_dict({"capture": {"positions": "first"}})
    with pytest.raises(ConfigError, match="expected an integer"):
        config_from_dict({"capture": {"batch_size": "8"}})
    with pytest.raises(ConfigError, match="expected an integer"):
        config_from_dict({"seed": True})
    with pytest.raises(ConfigError, match="kind 'lexicom' is unknown.*did you mean 'lexicon'"):
        config_from_dict({"reward": {"kind": "lexicom"}})
    with pytest.raises(ConfigError, match="secrets never go in a config"):
        config_from_dict({"reward": {"kind": "classifier", "params": {"api_key": "x"}}})


def test_overrides_and_bad_files(tmp_path):
    cfg = load_config(REPO / "experiments" / "tiny.toml", overrides={"capture.batch_size": 3, "seed": 7})
    assert cfg.capture.batch_size == 3 and cfg.seed == 7
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_stage_sections_register_and_validate():
    cfg = config_from_dict({"irm": {"max_words": 400, "layers": [1, 2]}})
    assert cfg.section("irm").max_words == 400
    assert cfg.to_dict()["irm"]["layers"] == [1, 2]
    with pytest.raises(ConfigError, match="feature_sets"):
        config_from_dict({"irm": {"feature_sets": ["tuned", "policy"]}})
