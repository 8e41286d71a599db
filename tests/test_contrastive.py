"""Contrastive explanations: attributes, perturbations, the random baseline, metrics, sources, the stage."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from irm.contrastive import (
    ATTRIBUTES,
    Attribute,
    LLMRewriteGenerator,
    ProgrammaticGenerator,
    RandomSubstitution,
    explain,
    get_attribute,
    load_comparisons,
    order_by_rm,
    register_attribute,
    split_hh_dialogue,
)
from irm.contrastive.attributes import _CURT_SENTENCES, _FILLER_CLAUSES, _FILLER_SENTENCES
from irm.contrastive.metrics import cluster_bootstrap_rate, kendall_tau, wilson_interval
from irm.contrastive.stage import ContrastiveConfig
from irm.contrastive.textops import (
    delete_phrases,
    edit_ops,
    insert_sentence,
    normalized_edit_distance,
    swap_words,
    word_edit_distance,
)
from irm.rewards import BaseRewardModel, TokenUtilityRM


@pytest.fixture(scope="module")
def vader():
    return TokenUtilityRM.from_vader()


@pytest.fixture(scope="module")
def sample30():
    return load_comparisons("sample", limit=30)


class LengthRM(BaseRewardModel):
    """Prefers longer responses: an RM whose one sensitivity we know."""

    name = "length"

    def score(self, prompts, responses):
        self._check_batch(prompts, responses)
        return np.array([len(r.split()) for r in responses], dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# text edits
def test_text_edits_record_what_they_changed():
    r = swap_words("Good film. A GOOD cast, goodness, good-ish plot.", {"good": "bad"})
    # Whole words only ("goodness" stays); a hyphen separates words ("20-minute" has the number 20).
    assert r.text == "Bad film. A BAD cast, goodness, bad-ish plot." and [e.before for e in r.edits] == [
        "Good", "GOOD", "good"]
    assert swap_words("nothing here", {"good": "bad"}) is None
    assert insert_sentence(" was fine.", "Whatever.").text == " was fine. Whatever."  # mid-sentence: append
    assert insert_sentence("It was fine.", "Look.").text == "Look. It was fine."
    d = delete_phrases("It was, I think, fine.", [r",?\s*\bI think\b,?"])
    assert d.text == "It was fine." and d.edits[0].op == "delete"
    assert word_edit_distance("a good film", "a very bad film") == 2
    assert edit_ops("a good film", "a very bad film") == (1, 1, 0)
    assert edit_ops("a b c d", "a d") == (0, 0, 2)
    assert normalized_edit_distance("a b", "a b") == 0.0 and normalized_edit_distance("a", "b") == 1.0


# ----------------------------------------------------------------------------------------------
# attributes
def test_registry_has_the_eight_attributes_and_takes_new_ones():
    want = {"sentiment", "refusal", "verbosity", "politeness", "hedging", "specificity", "fluency", "harmlessness"}
    assert want <= set(ATTRIBUTES)
    for a in ATTRIBUTES.values():
        assert a.description and a.more and a.less and callable(a.raise_fn) and callable(a.lower_fn)
    assert get_attribute("avoid-to-answer").name == "refusal" and get_attribute("manner").name == "politeness"
    with pytest.raises(ValueError, match="did you mean 'sentiment'"):
        get_attribute("sentimnet")
    shout = Attribute("shouting", "how loud", "louder", "quieter",
                      raise_fn=lambda t, rng: swap_words(t, {"film": "FILM"}) or "no film",
                      lower_fn=lambda t, rng: "nothing to lower", scorer=lambda t: sum(c.isupper() for c in t))
    register_attribute(shout)
    try:
        with pytest.raises(ValueError, match="twice"):
            register_attribute(shout)
        [p] = ProgrammaticGenerator().perturb([" a film."], "shouting", +1, seed=0)
        assert p.ok and p.text == " a FILM."
    finally:
        del ATTRIBUTES["shouting"]


CASES = {  # a text each edit applies to, in both directions
    "sentiment": " was a great film, and I loved the bad ending.",
    "refusal": " I'm sorry, but I can't help with that. It was a film.",
    "verbosity": " was a film, in other words, a long one. The cast was there.",
    "politeness": " was a film. Thank you for reading.",
    "hedging": " was definitely a film, I think.",
    "specificity": " had some things and a 20-minute opening scene.",
    "fluency": (" was was a film film.", " was a good film about a family."),  # (to raise, to lower)
    "harmlessness": " was violent and people die in it.",
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("direction", [1, -1])
def test_programmatic_edits_move_their_attribute(name, direction):
    a = get_attribute(name)
    text = CASES[name] if isinstance(CASES[name], str) else CASES[name][direction < 0]
    r = a.perturb(text, direction, np.random.default_rng(0))
    assert not isinstance(r, str), r
    assert r.text != text and r.edits
    assert (a.score(r.text) - a.score(text)) * direction > 0, (r.text, a.score(r.text), a.score(text))


def test_not_applicable_edits_say_why():
    [p] = ProgrammaticGenerator().perturb([" was a film."], "refusal", -1, seed=0)
    assert p.status == "not_applicable" and "refusal" in p.reason and p.text == p.original and not p.ok


def test_neutral_markers_carry_no_vader_sentiment(vader):
    # Verbosity padding and curt markers must not be sentiment changes in disguise.
    for phrase in _FILLER_CLAUSES + _FILLER_SENTENCES + _CURT_SENTENCES:
        assert vader.text_reward(phrase) == 0.0, phrase


# ----------------------------------------------------------------------------------------------
# random baseline and statistics
def test_random_twin_matches_the_edit_mix_and_is_seeded():
    rnd = RandomSubstitution("apple river stone cloud lamp".split())
    [p] = ProgrammaticGenerator().perturb([" was a fine film and a fine cast."], "refusal", +1, seed=0)
    t1 = rnd.perturb_like(p, np.random.default_rng(1))
    assert edit_ops(p.original, t1.text) == edit_ops(p.original, p.text) and t1.ok
    assert rnd.perturb_like(p, np.random.default_rng(1)).text == t1.text
    assert word_edit_distance(p.original, t1.text) == p.n_word_edits


def test_statistics():
    lo, hi = wilson_interval(24, 30)
    assert 0.62 < lo < 0.63 and 0.90 < hi < 0.91 and wilson_interval(0, 0) == (None, None)
    hits, totals = np.array([1, 0, 2, 0]), np.array([2, 2, 2, 0])
    lo, hi = cluster_bootstrap_rate(hits, totals, n_boot=500)
    assert 0 <= lo <= 0.5 <= hi <= 1
    assert kendall_tau({"a": 3, "b": 2, "c": 1}, {"a": 1, "b": 2, "c": 3}) == -1.0
    assert kendall_tau({"a": 1, "b": 1}, {"a": 1, "b": 2}) is None  # a constant side: undefined


# ----------------------------------------------------------------------------------------------
# the acceptance criterion and the engine
def test_lexicon_rm_on_30_comparisons_meets_the_done_criterion(vader, sample30):
    cfg = ContrastiveConfig()  # the stage's defaults
    res = explain(sample30, [vader], embedder=None, n_variants=cfg.n_variants, targets=cfg.targets,
                  n_bootstrap=200)
    s = res.summary()
    cov = s["coverage"]["vader"]
    assert cov["programmatic"]["n_comparisons"] == 30
    assert cov["programmatic"]["cf_coverage"] >= 0.8
    # The neutral random baseline of the same edit sizes: its CI lies wholly below the targeted one's.
    assert cov["random"]["cf_coverage_ci"][1] < cov["programmatic"]["cf_coverage_ci"][0]
    assert s["settings"]["random_vocabulary"]["source"] == "packaged"
    sens = s["sensitivity"]["vader"]["programmatic"]
    assert sens["top"] == "sentiment" and "sentiment" in sens["sensitive"]
    lo, hi = sens["pfr"]["sentiment"]["ci"]
    assert lo <= sens["pfr"]["sentiment"]["pfr"] <= hi
    # CF/SF follow from the margins: a CF reverses the sign, an SF keeps it.
    out = res.outcomes("vader")
    m0 = res.original_margins["vader"]
    for k, c in enumerate(res.candidates[:300]):
        if out[k] == "cf":
            assert m0[c.comparison] * res.margins["vader"][k] < 0
        elif out[k] == "sf":
            assert m0[c.comparison] * res.margins["vader"][k] > 0 and c.valid
    ex = s["examples"]["vader"]["programmatic"]
    assert ex and ex[0]["counterfactuals"] and ex[0]["local_global_tau"] >= ex[-1]["local_global_tau"]
    assert all(v["n"] > 0 for v in s["validity"].values())


def test_explanations_recover_what_each_rm_rewards(vader, sample30):
    res = explain(sample30[:12], {"vader": vader, "length": LengthRM()}, embedder=None, n_bootstrap=100)
    s = res.summary()
    # A length RM flips on verbosity edits most, but random edits of the same size change the length
    # just as much: no attribute clears the baseline, so no headline attribute is named.
    length = s["sensitivity"]["length"]["programmatic"]
    assert length["ranking"][0] == "verbosity" and length["top"] is None and length["sensitive"] == []
    assert s["sensitivity"]["vader"]["programmatic"]["top"] == "sentiment"
    d = s["disagreement"][0]
    assert d["rms"] == ["vader", "length"] and 0 <= d["flip_agreement"] < 1
    assert set(d["largest_gaps"]) & {"sentiment", "verbosity"}
    assert s["rank_agreement"]["programmatic"]["vader|length"] is not None


def test_semantic_distances_and_diversity_with_minilm(vader, sample30):
    res = explain(sample30[:4], [vader], attributes=["sentiment", "verbosity"], n_bootstrap=50)
    cov = res.summary()["coverage"]["vader"]["programmatic"]
    assert 0 < cov["cf_semantic_distance"] < 1 and cov["cf_diversity_semantic"] is not None
    cfs = [c for c, o in zip(res.candidates, res.outcomes("vader")) if o == "cf"]
    assert cfs and all(c.semantic is not None and 0 <= c.semantic <= 2 for c in cfs)


def test_huggingface_classifier_rm_is_explained_too(vader, sample30):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from irm.models import build_tiny_tokenizer
    from irm.rewards import SequenceClassifierRM

    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    import torch

    torch.manual_seed(0)
    clf = SequenceClassifierRM(LlamaForSequenceClassification(cfg), tok, input_format="concat", name="tiny_clf")
    res = explain(sample30[:5], [vader, clf], attributes=["sentiment", "fluency"], embedder=None, n_bootstrap=50)
    s = res.summary()
    assert set(s["coverage"]) == {"vader", "tiny_clf"}
    assert s["sensitivity"]["tiny_clf"]["programmatic"]["pfr"]["fluency"]["n"] > 0


def test_engine_validates_inputs(vader, sample30):
    with pytest.raises(ValueError, match="No comparisons"):
        explain([], [vader])
    with pytest.raises(ValueError, match="named 'vader'"):
        explain(sample30[:2], [vader, TokenUtilityRM.from_vader()])
    with pytest.raises(ValueError, match="targets"):
        explain(sample30[:2], [vader], targets=["neither"])

    class NaNRM(LengthRM):
        name = "nan"

        def score(self, prompts, responses):
            return np.full(len(responses), np.nan)

    with pytest.raises(FloatingPointError, match="non-finite"):
        explain(sample30[:2], [NaNRM()], embedder=None)


# ----------------------------------------------------------------------------------------------
# sources
def test_comparisons_from_files_hh_layout_and_generations(tmp_path, vader):
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": "P", "chosen": f" good {i}", "rejected": f" bad {i}"})
                           for i in range(3)))
    comps = load_comparisons(f, limit=2)
    assert [c.chosen for c in comps] == [" good 0", " good 1"]
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello, glad to help!",
                              "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}) + "\n")
    [c] = load_comparisons(hh, prompt_field=None)
    assert c.prompt == "\n\nHuman: Hi\n\nAssistant:" and c.chosen == " Hello, glad to help!"
    with pytest.raises(ValueError, match="Assistant"):
        split_hh_dialogue("no dialogue", "at all")
    with pytest.raises(ValueError, match="column 'prompt' not found"):
        load_comparisons(hh)
    ordered = order_by_rm(["P"] * 3, [" bad", " same", " fine"], [" good", " same", " awful"], vader)
    assert [(c.chosen, c.rejected) for c in ordered] == [(" good", " bad"), (" fine", " awful")]  # tie dropped


def test_comparisons_from_the_base_model_own_samples(tiny_base, vader):
    from irm.contrastive import comparisons_from_model
    from irm.data import default_prompts

    comps = comparisons_from_model(tiny_base, default_prompts()[:30], vader, 5, max_new_tokens=12)
    assert 1 <= len(comps) <= 5
    assert all(vader.compare(c.prompt, c.chosen, c.rejected).margin > 0 for c in comps)


# ----------------------------------------------------------------------------------------------
# LLM rewrite through an OpenAI-compatible server on loopback (scripted replies) and a local model
def test_llm_rewrite_two_steps_over_an_openai_compatible_server(tiny_base, monkeypatch):
    from llm_server import Fault, OpenAICompatibleServer

    from irm.llm import LocalChatLLM, OpenAICompatibleLLM

    with OpenAICompatibleServer(LocalChatLLM(tiny_base), model_name="tiny", max_requests=20) as srv:
        monkeypatch.setenv("IRM_LLM_BASE_URL", srv.base_url)
        gen = LLMRewriteGenerator(OpenAICompatibleLLM("tiny", backoff_s=0.0), max_tokens=32, format="json")
        srv.inject(Fault(reply='The phrases: ["boring", "nowhere"]'),  # step 1, one span not in the text
                   Fault(reply='not json at all'),                     # step 1 of the 2nd text: malformed
                   Fault(status=503),                                  # a transient error, retried
                   Fault(reply='{"boring": "gripping"}'))              # step 2 of the 1st text
        p1, p2 = gen.perturb([" was boring and slow.", " was fine."], "sentiment", +1, seed=0)
        assert p1.ok and p1.text == " was gripping and slow." and p1.meta["spans"] == ["boring"]
        assert [e.before for e in p1.edits] == ["boring"]  # only the chosen span changed
        assert p2.status == "failed" and "step 1" in p2.reason
        assert gen.parse_log.counts == {"spans": {"ok": 1, "failed": 1}, "mapping": {"ok": 1, "failed": 0}}
        asked = srv.requests[0]["body"]["messages"][-1]["content"]
        assert "Attribute: sentiment" in asked and "was boring and slow" in asked and "more positive" in asked
        assert get_attribute("sentiment").score(p1.text) > get_attribute("sentiment").score(p1.original)


def test_llm_rewrite_failures_are_reported_not_fatal(tiny_base, vader, sample30, tmp_path):
    from irm.llm import CachedLLM, LocalChatLLM

    # A random tiny model answers gibberish: every rewrite fails, and the report says so.
    llm = CachedLLM(LocalChatLLM(tiny_base), tmp_path)
    gen = LLMRewriteGenerator(llm, max_tokens=8)
    res = explain(sample30[:2], [vader], attributes=["sentiment"], generators=[ProgrammaticGenerator(), gen],
                  limits={"llm_rewrite": 2}, embedder=None, n_bootstrap=50)
    s = res.summary()
    v = s["validity"]["llm_rewrite/sentiment/+"]
    assert v["n"] == 4 and v["failed"] + v["ok"] == 4
    assert s["llm_parsing"]["llm_rewrite"]["n_failed"] >= v["failed"] > 0
    from irm.contrastive.report import render_markdown

    md = render_markdown(s, {}, {})  # every failed reply is listed in the report, not only counted
    assert md.count("| spans |") + md.count("| rewrite |") == s["llm_parsing"]["llm_rewrite"]["n_failed"]
    assert s["coverage"]["vader"]["programmatic"]["cf_coverage"] is not None
    misses = llm.stats.misses
    explain(sample30[:2], [vader], attributes=["sentiment"], generators=[gen], limits={"llm_rewrite": 2},
            embedder=None, n_bootstrap=50)
    assert llm.stats.misses == misses  # the rerun came from the cache


# ----------------------------------------------------------------------------------------------
# config and stage
def test_config_section_validates():
    from irm.run.config import ConfigError, config_from_dict

    cfg = config_from_dict({"contrastive": {"n_comparisons": 5, "llm": {"kind": "local", "model": "tiny-llama"}}})
    sec = cfg.section("contrastive")
    assert isinstance(sec, ContrastiveConfig) and sec.llm.model == "tiny-llama"
    for bad, msg in [({"attributes": ["sentimnet"]}, "sentiment"), ({"generators": ["gpt"]}, "valid generators"),
                     ({"n_comparisons": 0}, "n_comparisons"), ({"llm": {"params": {"api_key": "x"}}}, "environment"),
                     ({"n_comparisns": 3}, "did you mean 'n_comparisons'"), ({"llm_step1": "guess"}, "llm_step1"),
                     ({"llm_step2": "json"}, "llm_step2")]:
        with pytest.raises(ConfigError, match=msg):
            config_from_dict({"contrastive": bad})


def test_stage_explains_the_explicit_rm_and_the_run_irms(tmp_path):
    from irm.run.config import config_from_dict
    from irm.run.pipeline import open_context
    from irm.run.registry import STAGES
    from irm.run.wandb_offline import read_offline_run

    cfg = config_from_dict({"name": "ct", "run_dir": str(tmp_path / "run"), "models": {"base": "tiny-llama"},
                            "data": {"limit": 16},
                            "contrastive": {"source": "sample", "n_comparisons": 8, "semantic": False,
                                            "n_bootstrap": 50, "attributes": ["sentiment", "verbosity", "refusal"]}})
    ctx = open_context(cfg)
    try:
        ctx.state["irms"] = {"length": LengthRM()}
        STAGES["contrastive"][1](ctx)
    finally:
        ctx.tracker.finish()
    res = json.loads((tmp_path / "run" / "results.json").read_text())["contrastive"]
    assert res["rms"] == ["vader", "length"] and res["source"] == "sample" and res["n_comparisons"] == 8
    assert res["sensitivity"]["length"]["programmatic"]["ranking"][0] == "verbosity"
    assert res["fluency"]["model"] == "tiny-llama" and res["fluency"]["n_checked"] > 0  # the run's base model
    for p in res["plots"].values():
        assert os.path.getsize(p) > 1000
    md = (tmp_path / "run" / "contrastive.md").read_text()
    assert "| attribute | vader | length |" in md and "Counterfactual" in md
    tables = {p.name for p in (tmp_path / "run" / "tables").iterdir()}
    assert {"contrastive__pfr.json", "contrastive__examples.json", "contrastive__coverage.json"} <= tables
    if ctx.tracker.mode == "offline":
        summary = read_offline_run(tmp_path / "run")["summary"]
        assert "contrastive/cf_coverage/vader/programmatic" in summary


# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_llm_rewrite_on_the_local_default_llm(smollm2, vader, sample30, tmp_path):
    from irm.llm import CachedLLM, LocalChatLLM

    llm = CachedLLM(LocalChatLLM(smollm2), tmp_path)
    gen = LLMRewriteGenerator(llm, max_tokens=24)
    res = explain(sample30[:1], [vader], attributes=["sentiment"], generators=[gen], limits={"llm_rewrite": 1},
                  embedder=None, n_bootstrap=50)
    s = res.summary()
    made = [s["validity"][f"llm_rewrite/sentiment/{d}"] for d in "+-"]
    assert [v["n"] for v in made] == [2, 2]  # chosen and rejected, in each direction
    plog = s["llm_parsing"]["llm_rewrite"]
    assert plog["counts"]["choices"]["ok"] + plog["counts"]["choices"]["failed"] == 4
    words = plog["counts"].get("word", {"ok": 0, "failed": 0})
    assert llm.stats.misses == 4 + words["ok"] + words["failed"]  # step 2: one call per chosen word
    assert words["failed"] == 0 and words["ok"] > 0  # step 2 under the word grammar: every reply parses
    # Validity is measured, not assumed: every rewrite that changed the text was judged by VADER.
    for v in made:
        assert v["ok"] + v["failed"] == 2 and v["scored"] == v["ok"]


# ----------------------------------------------------------------------------------------------
# perturbations a reader trusts: articles, whole clauses, topical templates, fluency
OTHER_DOMAINS = [  # (prompt, chosen, rejected): restaurants, advice, products, software
    ("The restaurant", " was a delight: the soup was delicious and the staff were friendly.",
     " was a mess. The food was cold and the waiter was rude, so we left early."),
    ("Our dinner at the bistro", " was an amazing meal, and the dessert was perfect.",
     " was a boring meal with some stale bread and an awful sauce."),
    ("How do I keep a sourdough starter alive?", " Feed it flour and water once a day, and keep it somewhere warm.",
     " I'm sorry, but I can't help with that."),
    ("Can you explain what a hash table is?", " A hash table stores values under keys. It finds an item in one step, "
     "which is great for lookups.", " It is a thing that stores stuff, I think."),
    ("Review of the new headphones:", " They are excellent, with a clear sound and a battery that lasts 30 hours.",
     " They are flawed: the sound is muddy and the band is ugly and uncomfortable."),
    ("Should I learn Python or Java first?", " Python is definitely the better first choice, because the syntax is clear.",
     " Maybe Java, it seems, but honestly it depends on many things."),
    ("What do you think about the new library?", " It is an interesting and useful tool, thank you for asking.",
     " Whatever. It is a waste of time and I hate it."),
]


def _all_perturbations(comps):
    from irm.contrastive.attributes import detect_topic

    gen = ProgrammaticGenerator()
    out = []
    for name in ATTRIBUTES:
        for d in (1, -1):
            texts = [c[1] for c in comps] + [c[2] for c in comps]
            prompts = [c[0] for c in comps] * 2
            topics = [detect_topic(f"{p} {t}") for p, t in zip(prompts, texts)]
            for p, topic in zip(gen.perturb(texts, name, d, prompts=prompts, seed=0), topics):
                if p.ok:
                    out.append((p, topic))
    return out


def test_articles_agree_with_the_next_word():
    from irm.contrastive.textops import article_errors, article_for, fix_articles

    assert fix_articles("It was a amazing film. An boring one.").text == "It was an amazing film. A boring one."
    assert [article_for(w) for w in ("hour", "unique", "European", "uninspired", "8-hour", "1950s", "apple")] == [
        "an", "a", "a", "an", "an", "a", "an"]
    assert fix_articles("Plan A is fine.").text == "Plan A is fine."  # a capital A mid-sentence is a letter
    assert fix_articles("It was a awful day.", "It was a awful day.").text == "It was a awful day."  # not ours
    [p] = ProgrammaticGenerator().perturb([" was an amazing meal."], "sentiment", -1, prompts=["Dinner"], seed=0)
    assert p.text == " was a disappointing meal." and not article_errors(p.text, p.original)
    [p] = ProgrammaticGenerator().perturb([" was a boring film."], "sentiment", +1, prompts=["It"], seed=0)
    assert p.text == " was an interesting film."


def test_verbosity_trims_whole_clauses_only():
    a = get_attribute("verbosity")
    r = a.perturb("The food was delicious and the staff were friendly.", -1, np.random.default_rng(0))
    assert r.text == "The food was delicious."
    r = a.perturb(" film is superb, especially the lead, who gives a powerful and memorable performance.", -1,
                  np.random.default_rng(0))
    assert r.text == " film is superb, especially the lead."
    assert "unfinished" in a.perturb(" was great fun.", -1, np.random.default_rng(0))


def test_generated_perturbations_pass_the_reader_rules(sample30):
    """Every rule, on every programmatic perturbation of the packaged sample and of other domains."""
    from irm.contrastive.attributes import topic_templates
    from irm.contrastive.textops import article_errors, dangling_endings

    comps = [(c.prompt, c.chosen, c.rejected) for c in load_comparisons("sample")] + OTHER_DOMAINS
    perts = _all_perturbations(comps)
    assert len(perts) > 800 and {t for _, t in perts} == {"film", "food", "general"}
    film_only = {ph for tab in topic_templates().values() for ph in tab["film"]
                 if not any(ph in tab[t] for t in tab if t != "film")}
    bad = []
    for p, topic in perts:
        errs = article_errors(p.text, p.original) + dangling_endings(p.text, p.original)
        if topic != "film":
            errs += [ph for ph in film_only if ph in p.text and ph not in p.original]
        if errs:
            bad.append((p.attribute, p.direction, p.text, errs))
    assert not bad, bad[:5]


class _FakeFluency:
    """Perplexity 10 for texts with a marker, 2 otherwise (a test double of LMFluency)."""

    name = "fake"

    def __init__(self, marker):
        self.marker = marker

    def perplexity(self, prompts, texts):
        return np.array([10.0 if self.marker in t else 2.0 for t in texts])


def test_disfluent_perturbations_are_dropped_and_counted(vader, sample30):
    res = explain(sample30[:6], [vader], attributes=["refusal", "fluency"], embedder=None, n_bootstrap=50,
                  fluency=_FakeFluency("I'm sorry"), max_perplexity_ratio=2.5)
    f = res.summary()["fluency"]
    assert f["model"] == "fake" and f["n_dropped"] > 0 and f["by"]["programmatic/refusal/+"]["n_dropped"] > 0
    assert "programmatic/fluency/-" not in f["by"]  # disfluent on purpose: exempt
    assert res.validity["programmatic/refusal/+"]["disfluent"] == f["by"]["programmatic/refusal/+"]["n_dropped"]
    for c, o in zip(res.candidates, res.outcomes("vader")):
        if c.generator == "programmatic" and any("I'm sorry" in p.text and "I'm sorry" not in p.original
                                                  for p in c.sides()):
            assert o == "invalid" and c.fluency_ratio == 5.0
    with pytest.raises(ValueError, match="max_perplexity_ratio"):
        explain(sample30[:2], [vader], fluency=_FakeFluency("x"), max_perplexity_ratio=0.5)


def test_lm_fluency_is_the_perplexity_of_the_response(tmp_path):
    import torch

    from irm.contrastive import LMFluency
    from irm.models import load_model

    m = load_model("tiny-llama")
    flu = LMFluency(m, cache=tmp_path)
    got = flu.perplexity(["This movie was", "It"], [" a great film.", " was fine and fun."])
    tok = m.tokenizer
    for k, (p, t) in enumerate([("This movie was", " a great film."), ("It", " was fine and fun.")]):
        # The text as the tokenizer encodes it (as every scorer of irm does), the response's tokens
        # predicted from everything before them.
        ids = tok(p + t)["input_ids"]
        start = len(tok(p)["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(m.hf_model(torch.tensor([ids])).logits[0, :-1].float(), -1)
        nll = -logp[torch.arange(start - 1, len(ids) - 1), torch.tensor(ids[start:])]
        assert got[k] == pytest.approx(float(torch.exp(nll.mean())), rel=1e-4)
    again = LMFluency(m, cache=tmp_path)
    assert np.allclose(again.perplexity(["It"], [" was fine and fun."]), got[1:]) and again.n_scored == 0


def test_random_baseline_draws_neutral_words(vader):
    from irm.contrastive import neutral_vocabulary
    from irm.rewards.lexicon import load_lexicon, vader_lexicon_path

    words, info = neutral_vocabulary({"vader": vader})
    lex = load_lexicon(vader_lexicon_path())
    assert len(words) > 400 and not [w for w in words if w in lex] and info["rms"]["vader"]["reward_sd_kept"] == 0
    # Under an RM that reacts to some of them, the most distinctive words are left out.
    words2, info2 = neutral_vocabulary({"length": LengthRM(), "first_letter": _FirstLetterRM()})
    assert "apple" not in words2 and "table" in words2 and info2["n_kept"] < len(words)


class _FirstLetterRM(BaseRewardModel):
    name = "first_letter"

    def score(self, prompts, responses):
        return np.array([5.0 if r.strip()[:1] in "ae" else 0.0 for r in responses])


class _TableRM(BaseRewardModel):
    """Rewards read from a table: float-rounding twins of one reward are a tie."""

    name = "table"

    def __init__(self, table, default=0.0):
        self.table, self.default = table, default

    def score(self, prompts, responses):
        return np.array([self.table.get(r, self.default) for r in responses], dtype=np.float64)


def test_rounding_ties_are_ties_not_flips():
    from irm.contrastive import tie_margins
    from irm.contrastive.explain import Comparison

    assert tie_margins(np.array([1.22]), np.array([1.2200000000000002]))[0] == 0.0
    assert tie_margins(np.array([1.22]), np.array([1.21]))[0] == pytest.approx(0.01)
    comps = [Comparison("P", " was good.", " was bad.", id="t")]
    rm = _TableRM({" was good.": 1.22, " was bad.": 1.2200000000000002})
    res = explain(comps, [rm], attributes=["sentiment"], embedder=None, n_bootstrap=20)
    s = res.summary()
    assert s["original"]["n_ties"]["table"] == 1 and s["coverage"]["table"]["programmatic"]["n_comparisons"] == 0
    # A perturbed comparison within rounding of a tie is a tie, not a counterfactual.
    rm2 = _TableRM({" was good.": 1.5, " was bad.": 1.0}, default=1.2200000000000002)
    rm2.table[" was bad. I liked it a lot."] = 1.22
    res = explain(comps, [rm2], attributes=["sentiment"], embedder=None, n_bootstrap=20)
    out = res.outcomes("table")
    assert "cf" not in {o for c, o in zip(res.candidates, out) if c.generator == "programmatic"
                        and res.margins["table"][res.candidates.index(c)] == 0} and "tie" in set(out)
    ordered = order_by_rm(["P"], [" x"], [" y"], _TableRM({" x": 1.22, " y": 1.2200000000000002}))
    assert ordered == []


def test_headline_names_an_attribute_only_above_the_random_baseline(sample30):
    from irm.contrastive.report import headline

    flat = _TableRM({}, default=0.0)
    for c in sample30[:8]:
        flat.table[c.chosen] = 1.0  # prefers the labelled chosen, and no edit changes that
    res = explain(sample30[:8], [flat], embedder=None, n_bootstrap=50)
    s = res.summary()
    sens = s["sensitivity"]["table"]["programmatic"]
    assert all(e["pfr"] in (0.0, None) for e in sens["pfr"].values())
    assert sens["top"] is None and sens["sensitive"] == []
    assert "top: none" in "\n".join(headline(s)) and "top: fluency" not in "\n".join(headline(s))


def test_llm_rewrite_choices_format_over_an_openai_compatible_server(tiny_base, monkeypatch):
    """Step 1 picks word numbers from the text's own words; step 2 rewrites each chosen word."""
    from llm_server import Fault, OpenAICompatibleServer

    from irm.llm import LocalChatLLM, OpenAICompatibleLLM

    with OpenAICompatibleServer(LocalChatLLM(tiny_base), model_name="tiny", max_requests=20) as srv:
        monkeypatch.setenv("IRM_LLM_BASE_URL", srv.base_url)
        gen = LLMRewriteGenerator(OpenAICompatibleLLM("tiny", backoff_s=0.0), max_tokens=32, step1="generate")
        assert gen.format == "choices"
        srv.inject(Fault(reply="1, 2, 7"),         # text 1: words 1 (boring) and 2 (slow); 7 is off the list
                   Fault(reply="I cannot say."),   # text 2: no number: failed, and shown
                   Fault(reply="gripping"),        # boring -> gripping
                   Fault(reply="Replacement: brisk."))  # slow -> brisk
        p1, p2 = gen.perturb([" was boring and slow.", " was fine."], "sentiment", +1, seed=0)
        assert p1.ok and p1.text == " was gripping and brisk." and p1.meta["spans"] == ["boring", "slow"]
        assert p2.status == "failed" and "no number" in p2.reason
        assert gen.parse_log.counts == {"choices": {"ok": 1, "failed": 1}, "word": {"ok": 2, "failed": 0}}
        asked = srv.requests[0]["body"]["messages"][-1]["content"]
        assert "1. boring" in asked and "2. and" not in asked and "more positive" in asked


class _ScoringLLM:
    """A client with token probabilities: step 1 of the rewrite is read off them (constrained), step 2 generated."""

    name = "scoring-fake"

    def __init__(self, prefer: dict[str, float], replies: dict[str, str]):
        self.prefer, self.replies, self.asked = prefer, replies, []

    def complete(self, messages, **kw):
        return self.complete_many([messages], **kw)[0]

    def complete_many(self, batch, **kw):
        out = []
        for m in batch:
            word = re.search(r'Replace the word "([^"]+)"', m[-1]["content"])
            out.append(self.replies.get(word.group(1), "I cannot.") if word else "1")  # step 1 generated: "1"
        return out

    def choice_logprobs(self, batch, choices):
        self.asked += [m[-1]["content"] for m in batch]
        rows = []
        for m in batch:
            listing = dict(re.findall(r"^([A-Z])\. (.+)$", m[-1]["content"], re.M))
            rows.append([np.log(self.prefer.get(listing.get(c, ""), 0.01)) for c in choices])
        return np.array(rows)


def test_llm_rewrite_step1_scored_is_constrained_to_the_listed_words():
    gen = LLMRewriteGenerator(_ScoringLLM({"boring": 0.6, "slow": 0.5, "film": 0.05}, {"boring": "gripping",
                                                                                         "slow": "brisk"}), step1="auto")
    assert gen.step1 == "scored"  # the client exposes probabilities: no reply to parse in step 1
    (p,) = gen.perturb([" was a boring and slow film."], "sentiment", +1, seed=0)
    # boring (most probable) and slow (0.5 >= 0.8 x 0.6); film (0.05) is left alone
    assert p.ok and p.text == " was a gripping and brisk film." and p.meta["spans"] == ["boring", "slow"]
    assert gen.parse_log.counts == {"letter (scored)": {"ok": 1, "failed": 0}, "word": {"ok": 2, "failed": 0}}
    assert "A. boring" in gen.llm.asked[0] and "Reply only with its letter" in gen.llm.asked[0]
    strict = LLMRewriteGenerator(gen.llm, step1="scored", pick_share=1.0)
    assert strict.perturb([" was a boring and slow film."], "sentiment", +1)[0].meta["spans"] == ["boring"]
    with pytest.raises(ValueError, match="step1"):
        LLMRewriteGenerator(gen.llm, step1="guess")


def test_llm_rewrite_step1_falls_back_to_generated_replies_without_token_probabilities():
    from irm.llm import LLMError

    class NoProbs(_ScoringLLM):
        def choice_logprobs(self, batch, choices):
            raise LLMError("this server returns no logprobs")

    gen = LLMRewriteGenerator(NoProbs({}, {"boring": "gripping"}), step1="auto")
    (p,) = gen.perturb([" was a boring and slow film."], "sentiment", +1, seed=0)
    assert gen.step1 == "generate" and p.ok and p.text == " was a gripping and slow film."
    assert gen.parse_log.counts == {"choices": {"ok": 1, "failed": 0}, "word": {"ok": 1, "failed": 0}}


def test_llm_rewrite_step2_under_the_word_grammar_always_parses(tiny_base):
    """A random tiny model: its free replacements rarely parse (clauses, symbols); decoded under the word
    grammar every one is a word or short phrase that is not the original word, so every rewrite changes
    the text."""
    from irm.llm import LocalChatLLM

    class FirstWordThenTiny:
        """Step 1 always picks the first listed word (a tiny vocabulary has no letters to score); step 2 is
        the tiny model's own replies."""

        name = cache_id = "first-word-then-tiny"

        def __init__(self):
            self.tiny = LocalChatLLM(tiny_base)

        def complete(self, messages, **kw):
            return self.complete_many([messages], **kw)[0]

        def complete_many(self, batch, **kw):
            step2 = [i for i, m in enumerate(batch) if "Replace the word" in m[-1]["content"]]
            out = ["1"] * len(batch)
            for i, r in zip(step2, self.tiny.complete_many([batch[i] for i in step2], **kw), strict=True):
                out[i] = r
            return out

        def complete_words(self, batch, **kw):
            return self.tiny.complete_words(batch, **kw)

    llm = FirstWordThenTiny()
    texts = [" was a boring and slow film.", " the food was cold, the staff rude.", " a moving, honest story."]
    got = {}
    for step2 in ("words", "free"):
        gen = LLMRewriteGenerator(llm, step1="generate", step2=step2, max_tokens=10)
        out = gen.perturb(texts, "sentiment", +1, seed=0)
        got[step2] = (gen.parse_log.counts["word"], out)
    counts, out = got["words"]
    assert counts["failed"] == 0 and counts["ok"] >= len(texts)
    assert all(p.ok and p.text != p.original for p in out)
    for p in out:
        for w, r in p.meta["mapping"].items():
            assert re.match(r"^[A-Za-z][A-Za-z'-]*( [A-Za-z][A-Za-z'-]*){0,2}$", r) and r.lower() != w.lower()
    assert got["free"][0]["failed"] > 0  # the same model answering freely
    with pytest.raises(ValueError, match="step2"):
        LLMRewriteGenerator(llm, step2="json")
