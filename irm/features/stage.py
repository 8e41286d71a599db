"""The ``features`` stage of ``irm run``: SAEs on base and tuned, MMCS, autointerp, and the IRM checked
against the features.

1. **Texts**: the run's prompts, the tuned (and base) samples of the evaluation stage when there are
   any, and template sentences ("The movie was {w}") with lexicon words and as many neutral words,
   so reward-related tokens occur at all (openings of movie reviews carry little sentiment).
2. **Store**: base and tuned activations at every token of those texts, for 1-2 layers: the most
   divergent ones (``ctx.state["top_layers"]``), else the middle layer, snapped to a layer the IRM
   stage probed so the IRM direction is available there. Resumable: a rerun reuses it.
3. **SAEs** (sae-lens) for base and tuned, plus a second base SAE with another seed as the MMCS noise
   floor; explained variance, L0, dead share; saved in sae-lens's format and as wandb artifacts.
4. **MMCS** base vs tuned per layer; features that appear, vanish, shift; activation change.
5. **Autointerp** of ``n_features`` features per model and layer (half the most IRM-aligned, half
   random), precision/recall of the LLM's labels against the lexicon ground truth.
6. **Scored explanations** (:mod:`irm.features.scoring`, ``score_explanations``): from each explanation
   alone the LLM predicts which held-out snippets make the feature fire (detection; fuzzing on request);
   balanced accuracy and AUROC with 95% intervals per feature, and a plain verdict on the labelling LLM.
7. **Checks**: share of the IRM weight on flagged features vs a permutation baseline; activation rate
   of flagged features on texts the IRM scores high vs low. With scoring on, only labels of features
   whose explanation scores above chance count.

Everything goes to the ``features`` section of results.json (with ``skipped`` entries saying what
could not be done and why), plots under ``plots/``, wandb tables and artifacts.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from irm.core.log import get_logger
from irm.features.autointerp import (
    FeatureRecord,
    TokenTable,
    explain_and_classify,
    feature_snippets,
    lexicon_relevance,
    precision_recall,
    top_rows,
)
from irm.features.check import (
    activation_rate_check,
    alignment_test,
    feature_attributions,
    feature_irm_weights,
    irm_direction,
)
from irm.features.compare import activation_change, compare_dictionaries
from irm.features.sae import (
    SAETrainConfig,
    TrainedSAE,
    decoder_directions,
    effective_decoder,
    encode_rows,
    train_sae,
)
from irm.features.scoring import METHODS as SCORE_METHODS
from irm.features.scoring import ScoringSets, score_explanations, scoring_snippets
from irm.llm import LLMConfig
from irm.run.config import ConfigError, register_section
from irm.run.registry import RunContext, stage

__all__ = ["FeaturesConfig", "build_texts", "choose_layers", "select_features", "run_features"]

log = get_logger(__name__)

TEXT_KINDS = ("prompts", "samples", "words")
IRM_TARGETS = ("best", "logratio")


def _h(text: str, default: Any = None, factory: Any = None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _nested(value: Any, cls: type, where: str):
    """A nested TOML table (``[features.sae]``) as its dataclass, with the same checks as a section."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"[{where}] must be a table, got {type(value).__name__}: {value!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in value if k not in names]
    if unknown:
        hints = [f"{k!r}" + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(k, names, n=1)) else "")
                 for k in unknown]
        raise ConfigError(f"[{where}] unknown key(s) {', '.join(hints)}; valid keys: {sorted(names)}.")
    try:
        return cls(**value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{where}] {e}") from e


@dataclass
class FeaturesConfig:
    """The ``[features]`` section (``[features.sae]`` and ``[features.llm]`` are nested tables).

    >>> FeaturesConfig(n_features=12, sae={"architecture": "topk", "k": 16})
    """

    layers: list[int] | str = _h("'top': the most divergent layers (ctx.state['top_layers'], else the middle "
                                 "layer), snapped to layers the IRM stage probed; or a list of layer indices.", "top")
    n_layers: int = _h("How many layers with layers = 'top'.", 1)
    hook: str = _h("Hook template of the SAEs; the IRM checks need the IRM stage's hook.",
                   "blocks.{layer}.hook_resid_post")
    texts: list[str] = _h("Texts the SAEs are trained and read on: prompts, samples (the evaluation stage's "
                          "generations), words (template sentences with lexicon and neutral words).",
                          factory=lambda: list(TEXT_KINDS))
    n_word_texts: int = _h("Template sentences: half with lexicon words, half with neutral words.", 800)
    max_length: int = _h("Truncate texts to this many tokens.", 48)
    batch_size: int = _h("Texts per forward pass of the capture.", 32)
    sae: SAETrainConfig = _h("SAE training ([features.sae]).", factory=SAETrainConfig)
    seed_control: bool = _h("Train a second base SAE with another seed: the MMCS of two runs on the same data "
                            "is the floor against which base vs tuned is read.", True)
    match_threshold: float = _h("A feature whose best cosine in the other dictionary is below this "
                                "appeared (tuned) or vanished (base).", 0.5)
    n_features: int = _h("Features interpreted per model and layer.", 24)
    aligned_fraction: float = _h("Share of them picked by largest |IRM weight|; the rest at random.", 0.5)
    n_snippets: int = _h("Top-activating snippets shown to the LLM per feature.", 5)
    snippet_left: int = _h("Tokens of context before the top token.", 8)
    snippet_right: int = _h("Tokens of context after the top token.", 3)
    reward_description: str = _h("The reward in words, for the classification prompt.",
                                  "positive or negative sentiment")
    llm: LLMConfig = _h("LLM for explanations and labels ([features.llm]); max_tokens bounds an explanation.",
                        factory=lambda: LLMConfig(max_tokens=40))
    classify_tokens: int = _h("Most new tokens of a classification reply.", 12)
    classify_few_shot: bool = _h("Show the LLM two worked classification examples first (small models need "
                                 "them to answer in the parsable form; they cost ~200 prompt tokens).", True)
    classify_mode: str = _h("'calibrated': label = the LLM's log-odds of '1' over '0', minus those of a content-free "
                            "feature, > 0 (contextual calibration; needs token probabilities: local LLMs); "
                            "'generate': the label it writes; 'auto': calibrated where the LLM allows it.", "auto")
    score_explanations: bool = _h("Score each explanation (detection: from the explanation alone, the LLM says which "
                                  "held-out snippets make the feature fire; see irm.features.scoring). Only "
                                  "features whose explanation scores above chance (detection balanced accuracy's "
                                  "95% lower bound > 0.5) have their labels counted in the IRM checks.", True)
    n_score_snippets: int = _h("Held-out activating snippets per feature and method (as many non-activating ones "
                               "are added): 4 gives 8 prompts per feature and method.", 4)
    score_quantiles: int = _h("Activating snippets are drawn evenly from this many equal-count bins of the "
                              "held-out texts' peak activation (weak activations are scored too).", 4)
    score_methods: list[str] = _h("'detection' (which snippets activate it) and/or 'fuzzing' (are the marked "
                                  "tokens the active ones); detection decides the gate.",
                                  factory=lambda: ["detection"])
    score_mode: str = _h("'logprobs': predictions from the calibrated log-odds of '1' over '0' (needs token "
                         "probabilities); 'generate': the written 1/0 answers; 'auto': log-odds where the LLM "
                         "exposes them.", "auto")
    score_few_shot: bool = _h("Show two worked examples before each scoring question (~120 prompt tokens, "
                              "in the shared prefix).", True)
    relevance_top_k: int = _h("Ground truth: top-activating tokens whose words are looked up in the lexicon.", 20)
    relevance_threshold: float = _h("Ground truth: a feature is reward-relevant when at least this share of its "
                                    "top tokens carry lexicon utility.", 0.7)
    irm_target: str = _h("What the IRM direction is fitted to: 'best' (the IRM stage's best unsupervised "
                         "reconstruction) or 'logratio'.", "best")
    n_perm: int = _h("Permutations of the alignment test.", 10000)
    rate_fraction: float = _h("Activation-rate check: top and bottom share of texts by IRM score.", 1 / 3)
    log_artifacts: bool = _h("Log each SAE as a wandb artifact.", True)

    def __post_init__(self) -> None:
        self.sae = _nested(self.sae, SAETrainConfig, "features.sae")
        self.llm = _nested(self.llm, LLMConfig, "features.llm")
        if isinstance(self.layers, str) and self.layers != "top":
            raise ConfigError(f"[features] layers must be 'top' or a list of ints, got {self.layers!r}.")
        bad = [t for t in self.texts if t not in TEXT_KINDS]
        if bad or not self.texts:
            raise ConfigError(f"[features] texts {self.texts} must be a non-empty subset of {TEXT_KINDS}.")
        if "{layer}" not in self.hook:
            raise ConfigError(f"[features] hook {self.hook!r} has no '{{layer}}' placeholder, "
                              "e.g. 'blocks.{layer}.hook_resid_post'.")
        if self.classify_mode not in ("auto", "calibrated", "generate"):
            raise ConfigError(f"[features] classify_mode must be 'auto', 'calibrated' or 'generate', got "
                              f"{self.classify_mode!r}.")
        if self.score_mode not in ("auto", "logprobs", "generate"):
            raise ConfigError(f"[features] score_mode must be 'auto', 'logprobs' or 'generate', got "
                              f"{self.score_mode!r}.")
        bad = [m for m in self.score_methods if m not in SCORE_METHODS]
        if bad or "detection" not in self.score_methods:
            raise ConfigError(f"[features] score_methods {self.score_methods} must be a subset of {SCORE_METHODS} "
                              "that holds 'detection' (it decides which labels the IRM checks trust).")
        if self.irm_target not in IRM_TARGETS:
            raise ConfigError(f"[features] irm_target {self.irm_target!r} is not one of {IRM_TARGETS}.")
        for name in ("n_layers", "n_features", "n_snippets", "relevance_top_k", "n_perm", "batch_size",
                     "classify_tokens", "n_score_snippets", "score_quantiles"):
            if getattr(self, name) < 1:
                raise ConfigError(f"[features] {name} must be >= 1, got {getattr(self, name)}.")
        if self.n_word_texts < 0 or self.max_length < 2 or self.snippet_left < 0 or self.snippet_right < 0:
            raise ConfigError("[features] n_word_texts, snippet_left and snippet_right must be >= 0 and "
                              "max_length >= 2.")
        for name in ("aligned_fraction", "relevance_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"[features] {name} must be in [0, 1], got {getattr(self, name)}.")
        if not 0 < self.rate_fraction <= 0.5:
            raise ConfigError(f"[features] rate_fraction must be in (0, 0.5], got {self.rate_fraction}.")
        if not -1 <= self.match_threshold <= 1:
            raise ConfigError(f"[features] match_threshold is a cosine in [-1, 1], got {self.match_threshold}.")


register_section("features", FeaturesConfig)


# ----------------------------------------------------------------------------------------------
def _hash01(*parts: Any) -> float:
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:12], 16) / 16**12


def build_texts(
    kinds: list[str],
    *,
    prompts: list[str],
    samples: list[dict[str, str]] | None,
    lexicon_words: list[str],
    neutral_words: list[str],
    n_word_texts: int,
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """``(texts, kind of each text)``: prompts, prompt + sample responses, and template sentences with
    ``n_word_texts // 2`` lexicon words and as many neutral words (deterministic in ``seed``)."""
    from irm.implicit.words import TEMPLATES

    texts: list[str] = []
    kind: list[str] = []
    if "prompts" in kinds:
        texts += list(prompts)
        kind += ["prompt"] * len(prompts)
    if "samples" in kinds and samples:
        for s in samples:
            for role in ("tuned", "base"):
                if s.get(role):
                    texts.append(s["prompt"] + s[role])
                    kind.append(f"sample_{role}")
    if "words" in kinds and n_word_texts > 0:
        half = n_word_texts // 2
        lex = sorted(set(lexicon_words), key=lambda w: _hash01(seed, "lex", w))[:half]
        neu = sorted(set(neutral_words) - set(lexicon_words), key=lambda w: _hash01(seed, "neu", w))[:half]
        for group, words in (("word_lexicon", lex), ("word_neutral", neu)):
            for w in words:
                t = TEMPLATES[int(_hash01(seed, "tpl", w) * len(TEMPLATES))]
                texts.append(t.replace("{w}", w))
                kind.append(group)
    keep = [i for i, t in enumerate(texts) if t.strip()]
    return [texts[i] for i in keep], [kind[i] for i in keep]


def _neutral_words(prompts: list[str], utility) -> list[str]:
    from irm.implicit.words import NEUTRAL_WORDS

    words = {w for p in prompts for w in re.findall(r"[a-z]{3,}", p.lower())} | set(NEUTRAL_WORDS)
    return sorted(w for w in words if utility is None or utility(w) is None)


def choose_layers(layers: list[int] | str, n: int, n_layers: int, top_layers: list[int] | None,
                  probed: list[int] | None) -> tuple[list[int], str]:
    """The layers to train SAEs on, and how they were chosen (recorded in the results)."""
    if isinstance(layers, list):
        out = []
        for li in layers:
            li = int(li) + (n_layers if int(li) < 0 else 0)
            if not 0 <= li < n_layers:
                raise ValueError(f"[features] layer {li} is out of range for a model with {n_layers} layers.")
            out.append(li)
        return sorted(set(out)), "configured"
    if top_layers:
        cand, how = [int(x) for x in top_layers[:n]], "most divergent (divergence stage)"
    else:
        cand, how = [n_layers // 2], "middle layer (no divergence stage ran)"
    if probed:
        snapped = sorted({min(probed, key=lambda p: (abs(p - c), p)) for c in cand})
        if snapped != sorted(set(cand)):
            how += f", snapped from {cand} to layers the IRM stage probed"
        cand = snapped
    return sorted(set(cand))[:n], how


def select_features(alive: np.ndarray, n: int, *, weights: np.ndarray | None, aligned_fraction: float,
                    seed: int) -> list[tuple[int, str]]:
    """``n`` features among ``alive`` ones: the ``aligned_fraction`` with largest |IRM weight| ("aligned"),
    the rest at random ("random"); all random without weights."""
    rng = np.random.default_rng(seed)
    ids = np.flatnonzero(alive)
    picked: list[tuple[int, str]] = []
    if weights is not None and len(ids):
        n_al = int(round(n * aligned_fraction))
        for j in ids[np.argsort(-np.abs(weights[ids]), kind="stable")][:n_al]:
            picked.append((int(j), "aligned"))
    rest = np.setdiff1d(ids, [j for j, _ in picked])
    for j in rng.permutation(rest)[: max(0, n - len(picked))]:
        picked.append((int(j), "random"))
    return picked


def _score_texts(rm, texts: list[str]) -> np.ndarray:
    if hasattr(rm, "text_reward"):
        return np.array([rm.text_reward(t) for t in texts], dtype=np.float64)
    return np.asarray(rm.score([""] * len(texts), texts), dtype=np.float64)


def _clean_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", s)


# ----------------------------------------------------------------------------------------------
@stage("features", order=80)
def _stage_features(ctx: RunContext) -> None:
    cfg: FeaturesConfig = ctx.cfg.section("features")
    run_features(ctx, cfg)


def run_features(ctx: RunContext, cfg: FeaturesConfig) -> dict[str, Any]:
    """Run the stage on ``ctx`` with ``cfg``; returns (and writes) the ``features`` results section."""
    from irm.activations.capture import StoreExistsError, capture_activations, records_from_texts

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    skipped: list[dict[str, str]] = []
    if ctx.base is None:
        ctx.load_models()
    base = ctx.base if ctx.pair is None else ctx.pair.base
    models = {"base": base} if ctx.pair is None else {"base": ctx.pair.base, "tuned": ctx.pair.tuned}
    roles = list(models)
    if ctx.pair is None:
        skipped.append({"what": "tuned SAEs, MMCS, activation change",
                        "why": "no tuned model ([models] tuned is empty and no tuning stage produced one)"})
    seed = ctx.cfg.seed

    # The LLM first: a misconfigured endpoint fails before minutes of training.
    t = time.perf_counter()
    reuse = cfg.llm.kind == "local" and cfg.llm.model == ctx.cfg.models.base
    llm = cfg.llm.build(model=base if reuse else None)
    timings["llm_load"] = time.perf_counter() - t

    irm_data = ctx.state.get("irm_data")
    irm_results = ctx.state.get("irm_results")
    irms = ctx.state.get("irms") or {}
    utility = getattr(ctx.rm, "word_utility", None)
    if irm_data is None:
        skipped.append({"what": "IRM alignment and activation-rate checks; aligned feature selection",
                        "why": "the irm stage did not run or produced no word data (it needs a tuned model "
                               "and a lexicon RM)"})
    if utility is None:
        skipped.append({"what": "lexicon ground truth (precision/recall of LLM labels)",
                        "why": f"the explicit RM {getattr(ctx.rm, 'name', None)!r} has no word -> utility table"})

    # Texts and store --------------------------------------------------------------------------
    t = time.perf_counter()
    if irm_data is not None:
        lex_words = list(irm_data.words)
    elif hasattr(ctx.rm, "alphabetic_words"):
        lex_words = ctx.rm.alphabetic_words()
    else:
        lex_words = []
    texts, kinds = build_texts(cfg.texts, prompts=list(ctx.prompts), samples=ctx.state.get("samples"),
                               lexicon_words=lex_words, neutral_words=_neutral_words(list(ctx.prompts), utility),
                               n_word_texts=cfg.n_word_texts if lex_words else 0, seed=seed)
    if "samples" in cfg.texts and not ctx.state.get("samples"):
        skipped.append({"what": "sample texts", "why": "no evaluation samples in ctx.state['samples']"})
    if not texts:
        raise ValueError(f"[features] texts {cfg.texts} gave no texts (no prompts, samples or lexicon words).")
    n_model_layers = base.n_layers
    probed = None
    if irm_data is not None:
        probed = sorted(int(m.group(1)) for h in irm_data.feats
                        if (m := re.fullmatch(re.escape(cfg.hook).replace(r"\{layer\}", r"(\d+)"), h)))
    layers, layer_how = choose_layers(cfg.layers, cfg.n_layers, n_model_layers, ctx.state.get("top_layers"), probed)
    hooks = [cfg.hook.format(layer=li) for li in layers]
    fdir = ctx.run.sub("features")
    kw = dict(hooks=hooks, positions="all", batch_size=cfg.batch_size, shard_size=512, max_length=cfg.max_length,
              dtype="float32", dataset={"source": "features texts", "kinds": sorted(set(kinds))})
    records = records_from_texts(texts)
    try:
        store = capture_activations(models, records, fdir / "store", **kw)
    except StoreExistsError:
        log.info("features: the store in %s was made with other settings; recapturing", fdir / "store")
        store = capture_activations(models, records, fdir / "store", overwrite=True, **kw)
    index = store.index()
    table = TokenTable.from_texts(base.tokenizer, texts, max_length=cfg.max_length).check(index)
    eligible = index["pos"] >= cfg.sae.min_pos
    text_of_row = index["text"]
    timings["capture"] = time.perf_counter() - t

    section: dict[str, Any] = {
        "layers": layers, "layer_choice": layer_how, "hooks": hooks, "roles": roles,
        "store": {"path": str(store.path), "rows": store.n_rows, "n_texts": len(texts),
                  "texts_by_kind": {k: kinds.count(k) for k in sorted(set(kinds))}},
        "sae_config": dataclasses.asdict(cfg.sae), "saes": {}, "mmcs": {}, "activation_change": {},
        "irm_direction": {}, "alignment": {}, "activation_rate": {}, "skipped": skipped,
    }

    # SAEs, MMCS, IRM weights, feature selection, snippets -------------------------------------
    feature_recs: list[FeatureRecord] = []
    score_sets: dict[str, ScoringSets] = {}
    per_hook: dict[str, dict[str, Any]] = {}
    target = _irm_target(irm_data, irm_results, cfg.irm_target) if irm_data is not None else None
    for hook in hooks:
        t = time.perf_counter()
        saes: dict[str, TrainedSAE] = {}
        for role in roles:
            saes[role] = train_sae(store, role, hook, cfg.sae, seed=seed,
                                   out_dir=fdir / "saes" / f"{role}-{hook}", model_name=models[role].identity.spec)
        if cfg.seed_control and "tuned" in models:
            saes["base_seed2"] = train_sae(store, "base", hook, cfg.sae, seed=seed + 1,
                                           out_dir=fdir / "saes" / f"base_seed2-{hook}",
                                           model_name=base.identity.spec)
        section["saes"][hook] = {r: {k: v for k, v in s.metrics.items() if k != "config"} | {"path": str(s.path)}
                                 for r, s in saes.items()}
        timings[f"train_{hook}"] = time.perf_counter() - t
        if cfg.log_artifacts:
            for r, s in saes.items():
                ctx.tracker.log_artifact(s.path, name=_clean_name(f"sae-{ctx.cfg.name}-{r}-{hook}"), type="sae",
                                         metadata={k: v for k, v in s.metrics.items() if k != "config"})

        t = time.perf_counter()
        acts = {r: encode_rows(s.sae, store.load("base" if r == "base_seed2" else r, hook)) for r, s in saes.items()}
        active_any = {r: (a[torch.from_numpy(eligible)] > 0).any(0).numpy() for r, a in acts.items()}
        rate = {r: (a[torch.from_numpy(eligible)] > 0).double().mean(0).numpy() for r, a in acts.items()}
        alive = {r: np.asarray((a[torch.from_numpy(eligible)] > 0).sum(0).numpy() >= 2) for r, a in acts.items()}
        dirs = {r: decoder_directions(s.sae) for r, s in saes.items()}
        if "tuned" in saes:
            cmp_all = compare_dictionaries(dirs["base"], dirs["tuned"], threshold=cfg.match_threshold)
            cmp = compare_dictionaries(dirs["base"], dirs["tuned"], threshold=cfg.match_threshold,
                                       alive_base=active_any["base"], alive_tuned=active_any["tuned"])
            res = cmp.to_dict() | {"mmcs_all_features": cmp_all.mmcs}
            if "base_seed2" in saes:
                ctrl = compare_dictionaries(dirs["base"], dirs["base_seed2"], threshold=cfg.match_threshold,
                                            alive_base=active_any["base"], alive_tuned=active_any["base_seed2"])
                res["seed_control"] = {"mmcs": ctrl.mmcs, "mmcs_max_base": ctrl.mmcs_max_base,
                                       "n_appeared": len(ctrl.appeared), "n_vanished": len(ctrl.vanished),
                                       "note": "base SAE vs a base SAE trained with another seed: the MMCS "
                                               "floor of training noise alone"}
            section["mmcs"][hook] = res
            section["activation_change"][hook] = activation_change(
                acts["base"][torch.from_numpy(eligible)], acts["tuned"][torch.from_numpy(eligible)],
                cmp.match_base, cmp.match_tuned, k=10)
            per_hook.setdefault(hook, {})["cmp"] = (cmp, ctrl.match_cos if "base_seed2" in saes else None)
        timings[f"compare_{hook}"] = time.perf_counter() - t

        weights: dict[str, np.ndarray | None] = {r: None for r in roles}
        ws: dict[str, np.ndarray] = {}
        if target is not None:
            y, y_name = target
            if hook in irm_data.feats:
                for r in roles:
                    w, info = irm_direction(irm_data.feats[hook][r], y, irm_data.fit)
                    ws[r] = w
                    weights[r] = feature_irm_weights(dirs[r], w)
                    section["irm_direction"].setdefault(hook, {})[r] = info | {"target": y_name}
            else:
                skipped.append({"what": f"IRM checks at {hook}",
                                "why": f"the irm stage probed {sorted(irm_data.feats)}, not {hook}"})
        for r in roles:
            picked = select_features(alive[r], cfg.n_features, weights=weights[r],
                                     aligned_fraction=cfg.aligned_fraction, seed=seed + roles.index(r))
            for j, how in picked:
                snippets, shown = feature_snippets(table, acts[r], j, eligible=eligible, k=cfg.n_snippets,
                                                   left=cfg.snippet_left, right=cfg.snippet_right)
                a_j = acts[r][:, j].numpy()
                top = top_rows(a_j, text_of_row, eligible, cfg.relevance_top_k, one_per_text=False)
                tt, pp = table.locate(top)
                words = [table.word_at(int(a), int(b)) for a, b in zip(tt, pp, strict=True)]
                rec = FeatureRecord(role=r, hook=hook, feature=j, selection=how,
                                    irm_weight=None if weights[r] is None else float(weights[r][j]),
                                    firing_rate=float(rate[r][j]), max_activation=float(a_j.max()),
                                    snippets=snippets, top_words=words)
                if utility is not None:
                    rec.relevance = lexicon_relevance(words, utility)
                    rec.relevant = None if rec.relevance is None else rec.relevance >= cfg.relevance_threshold
                feature_recs.append(rec)
                if cfg.score_explanations:  # held out: never the texts the explanation is written from
                    score_sets[rec.key] = scoring_snippets(
                        table, a_j, eligible=eligible, exclude_texts=table.locate(shown)[0], n=cfg.n_score_snippets,
                        n_quantiles=cfg.score_quantiles, left=cfg.snippet_left, right=cfg.snippet_right, seed=seed,
                        key=rec.key)
        per_hook.setdefault(hook, {}).update(acts=acts, saes=saes, ws=ws)

    # Autointerp -------------------------------------------------------------------------------
    from irm.llm import ParseLog

    t = time.perf_counter()
    plog = ParseLog()
    classify = explain_and_classify(llm, feature_recs, cfg.reward_description, plog=plog,
                                    explain_tokens=cfg.llm.max_tokens, classify_tokens=cfg.classify_tokens,
                                    temperature=cfg.llm.temperature, seed=cfg.llm.seed,
                                    few_shot=cfg.classify_few_shot, mode=cfg.classify_mode)
    timings["autointerp"] = time.perf_counter() - t
    if classify.get("calibration_unavailable"):
        log.warning("features: labels are the ones the LLM wrote: %s", classify["calibration_unavailable"])
    section["autointerp"] = {
        "llm": llm.name, "n_features": len(feature_recs), "reward_description": cfg.reward_description,
        "classify": classify, "n_flagged_generated": sum(r.label_generated == 1 for r in feature_recs),
        "n_labelled": sum(r.label is not None for r in feature_recs),
        "n_flagged": sum(r.label == 1 for r in feature_recs), "parse": plog.to_dict(),
        "cache": llm.stats.to_dict() if hasattr(llm, "stats") and hasattr(llm.stats, "to_dict") else None,
    }
    if cfg.score_explanations:
        t = time.perf_counter()
        n_before = _cache_misses(llm)
        scoring = score_explanations(llm, [(r.key, r.explanation, score_sets[r.key]) for r in feature_recs
                                           if r.explanation], plog=(splog := ParseLog()), methods=cfg.score_methods,
                                     mode=cfg.score_mode, few_shot=cfg.score_few_shot, seed=cfg.llm.seed)
        for r in feature_recs:
            got = scoring["features"].get(r.key)
            r.scores = got
            r.explanation_above_chance = None if got is None else got["above_chance"]
        timings["scoring"] = time.perf_counter() - t
        section["scoring"] = {k: v for k, v in scoring.items() if k != "features"} | {
            "n_score_snippets": cfg.n_score_snippets, "score_quantiles": cfg.score_quantiles,
            "parse": splog.to_dict(), "seconds": timings["scoring"], "cache_misses": _cache_misses(llm) - n_before if n_before is not None else None}
        section["autointerp"]["n_trusted"] = sum(bool(r.explanation_above_chance) and r.label is not None
                                                 for r in feature_recs)
        log.info("features: %s", scoring["verdict"])
        if scoring.get("logprobs_unavailable"):
            log.warning("features: explanation scores use the written answers: %s", scoring["logprobs_unavailable"])
    else:
        section["scoring"] = {"skipped": "score_explanations = false: every parsed label counts in the IRM checks, "
                                         "whether or not its explanation predicts where the feature fires"}
    if utility is not None:
        rel = [r.relevance for r in feature_recs if r.relevance is not None]
        all_words = [table.word_at(int(a), int(b)) for a, b in zip(*table.locate(np.flatnonzero(eligible)), strict=True)]
        section["ground_truth"] = {
            "definition": f"relevant = at least {cfg.relevance_threshold} of the feature's top {cfg.relevance_top_k} "
                          "activating tokens lie in words with nonzero lexicon utility",
            "base_rate": lexicon_relevance(all_words, utility),
            "n_relevant": sum(bool(r.relevant) for r in feature_recs),
            "mean_relevance": float(np.mean(rel)) if rel else None,
            "overall": precision_recall([r.label for r in feature_recs], [r.relevant for r in feature_recs]),
            "by_role": {role: precision_recall([r.label for r in feature_recs if r.role == role],
                                               [r.relevant for r in feature_recs if r.role == role])
                        for role in roles},
        }
        if cfg.score_explanations:  # the labels the IRM checks use: those of above-chance explanations
            trusted = [r for r in feature_recs if r.explanation_above_chance]
            section["ground_truth"]["trusted"] = precision_recall([r.label for r in trusted],
                                                                  [r.relevant for r in trusted])
        if classify["mode"] == "calibrated":  # how the written labels would have done, for comparison
            section["ground_truth"]["generated_labels"] = precision_recall(
                [r.label_generated for r in feature_recs], [r.relevant for r in feature_recs])

    # Checks -----------------------------------------------------------------------------------
    t = time.perf_counter()
    rate_rm = irms.get("irm_linear")
    scores = _score_texts(rate_rm, texts) if rate_rm is not None else None
    if irm_data is not None and rate_rm is None:
        skipped.append({"what": "activation-rate check", "why": "no 'irm_linear' reward model in ctx.state['irms']"})
    nulls: dict[str, np.ndarray] = {}
    for hook in hooks:
        ph = per_hook[hook]
        for r in roles:
            labelled = [x for x in feature_recs if x.hook == hook and x.role == r and x.label is not None]
            # With scored explanations, a label counts only where its explanation beats chance.
            recs = [x for x in labelled if not cfg.score_explanations or x.explanation_above_chance]
            if r in ph["ws"] and labelled:
                # The alignment test with the lexicon ground truth in place of the LLM's labels (over every
                # labelled feature, whatever the scores): does the IRM direction load on features that
                # really are about reward words, whatever the LLM said?
                truth = [x.relevant for x in labelled]
                if all(t is not None for t in truth):
                    lids = torch.as_tensor([x.feature for x in labelled])
                    lattr = feature_attributions(ph["acts"][r][torch.from_numpy(eligible)][:, lids],
                                                 effective_decoder(ph["saes"][r].sae)[lids], ph["ws"][r])
                    gt_al = alignment_test(np.abs([x.irm_weight for x in labelled]), np.array(truth, bool),
                                           n_perm=cfg.n_perm, seed=seed)
                    gt_al.pop("_null", None)
                    gt_attr = alignment_test(lattr, np.array(truth, bool), n_perm=cfg.n_perm, seed=seed)
                    gt_attr.pop("_null", None)
                    section.setdefault("alignment_ground_truth", {}).setdefault(hook, {})[r] = {
                        "weight": gt_al, "attribution": gt_attr}
            if not recs:
                if labelled:
                    note = {"note": f"none of the {len(labelled)} labelled features' explanations scored above "
                                    "chance (detection balanced accuracy's 95% lower bound > 0.5): the LLM's "
                                    "labels are not trusted and the check is not run"}
                else:
                    note = {"note": "no interpreted feature got a parsed label from the LLM (see autointerp.parse)"}
                if r in ph["ws"]:
                    section["alignment"].setdefault(hook, {})[r] = {"weight": note, "attribution": note}
                if scores is not None:
                    section["activation_rate"].setdefault(hook, {})[r] = note
                continue
            ids = np.array([x.feature for x in recs])
            flagged = np.array([x.label == 1 for x in recs])
            if r in ph["ws"]:
                w = ph["ws"][r]
                al = alignment_test(np.abs([x.irm_weight for x in recs]), flagged, n_perm=cfg.n_perm, seed=seed)
                null = al.pop("_null", None)
                if null is not None:
                    nulls[f"{r} {hook}"] = (null, al["share"])
                attr = feature_attributions(ph["acts"][r][torch.from_numpy(eligible)][:, torch.as_tensor(ids)],
                                            effective_decoder(ph["saes"][r].sae)[torch.as_tensor(ids)], w)
                al_attr = alignment_test(attr, flagged, n_perm=cfg.n_perm, seed=seed)
                al_attr.pop("_null", None)
                section["alignment"].setdefault(hook, {})[r] = {"weight": al, "attribution": al_attr,
                                                                "n_untrusted_excluded": len(labelled) - len(recs)}
            if scores is not None:
                active = (ph["acts"][r][:, torch.as_tensor(ids)] > 0)[torch.from_numpy(eligible)]
                section["activation_rate"].setdefault(hook, {})[r] = activation_rate_check(
                    scores, active, text_of_row[eligible], flagged, fraction=cfg.rate_fraction, seed=seed)
    timings["checks"] = time.perf_counter() - t

    section["features"] = [r.to_dict() for r in feature_recs]
    section["timings"] = timings
    section["seconds"] = time.perf_counter() - t_start
    _plots(ctx, section, per_hook, nulls)
    ctx.run.update_results("features", section)
    _track(ctx, section, feature_recs)
    log.info("features stage: %d SAEs, %d features interpreted (%d labelled), %.1f s",
             sum(len(v) for v in section["saes"].values()), len(feature_recs),
             section["autointerp"]["n_labelled"], section["seconds"])
    return section


def _cache_misses(llm: Any) -> int | None:
    stats = getattr(llm, "stats", None)
    return int(stats.misses) if stats is not None and hasattr(stats, "misses") else None


def _irm_target(data, results, kind: str) -> tuple[np.ndarray, str]:
    from irm.implicit.reconstruct import UNSUPERVISED, best

    if kind == "best" and results:
        src = best(results, UNSUPERVISED)
        return np.asarray(src.pred_all, dtype=np.float64), src.name
    return (data.lp_tuned - data.lp_base).mean(1), "logratio"


def _track(ctx: RunContext, section: dict[str, Any], recs: list[FeatureRecord]) -> None:
    summary: dict[str, float] = {"features/seconds": section["seconds"]}
    for hook, by_role in section["saes"].items():
        layer = hook.split(".")[1]
        for r, m in by_role.items():
            for k in ("explained_variance", "l0", "dead_share"):
                summary[f"features/{r}_L{layer}_{k}"] = m[k]
    for hook, m in section["mmcs"].items():
        summary[f"features/mmcs_L{hook.split('.')[1]}"] = m["mmcs"]
    gt = section.get("ground_truth", {}).get("overall")
    if gt:
        for k in ("precision", "recall"):
            if gt[k]["value"] is not None:
                summary[f"features/llm_{k}"] = gt[k]["value"]
    sc = section.get("scoring", {})
    if sc.get("overall"):
        for m, v in sc["overall"].items():
            if v["balanced_accuracy"]["value"] is not None:
                summary[f"features/{m}_balanced_accuracy"] = v["balanced_accuracy"]["value"]
                summary[f"features/{m}_balanced_accuracy_low"] = v["balanced_accuracy"]["low"]
            if v["auroc"]["value"] is not None:
                summary[f"features/{m}_auroc"] = v["auroc"]["value"]
        summary["features/n_explanations_above_chance"] = sc["n_above_chance"]
        summary["features/llm_above_chance"] = float(bool(sc["llm_above_chance"]))
        rows = []
        for r in recs:
            if not r.scores:
                continue
            row = [r.role, r.hook, r.feature, r.explanation]
            for m in sc["methods"]:
                ba, au = r.scores[m]["balanced_accuracy"], r.scores[m]["auroc"]
                row += [ba["value"], ba["low"], ba["high"], au["value"], au["low"], au["high"]]
            rows.append(row + [r.explanation_above_chance, r.label, sc["verdict"]])
        cols = ["role", "hook", "feature", "explanation"]
        for m in sc["methods"]:
            cols += [f"{m}_bal_acc", f"{m}_bal_acc_low", f"{m}_bal_acc_high", f"{m}_auroc", f"{m}_auroc_low",
                     f"{m}_auroc_high"]
        ctx.tracker.log_table("features/explanation_scores", cols + ["above_chance", "label", "llm_verdict"], rows)
    ctx.tracker.summary(summary)
    ctx.tracker.log_table(
        "features/autointerp",
        ["role", "hook", "feature", "selection", "irm_weight", "firing_rate", "relevance", "relevant", "explanation",
         "label", "label_score", "label_generated", "attribute", "explanation_above_chance", "top_snippets", "errors"],
        [[r.role, r.hook, r.feature, r.selection, r.irm_weight, r.firing_rate, r.relevance, r.relevant, r.explanation,
          r.label, r.label_score, r.label_generated, r.attribute, r.explanation_above_chance, "\n".join(r.snippets),
          "; ".join(r.errors)]
         for r in recs])
    rows = [[hook, r, m["architecture"], m["d_sae"], m["explained_variance"], m["l0"], m["dead_share"], m["seconds"]]
            for hook, by_role in section["saes"].items() for r, m in by_role.items()]
    ctx.tracker.log_table("features/saes", ["hook", "role", "architecture", "d_sae", "explained_variance", "l0",
                                            "dead_share", "seconds"], rows)


def _plots(ctx: RunContext, section: dict[str, Any], per_hook: dict[str, Any], nulls: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = ctx.run.sub("plots")
    cmps = {h: v["cmp"] for h, v in per_hook.items() if "cmp" in v}
    if cmps:
        fig, axes = plt.subplots(1, len(cmps), figsize=(5 * len(cmps), 3.5), squeeze=False)
        for ax, (hook, (cmp, ctrl)) in zip(axes[0], cmps.items(), strict=True):
            bins = np.linspace(-0.2, 1, 49)
            ax.hist(cmp.match_cos, bins=bins, alpha=0.7, label=f"base vs tuned (MMCS {cmp.mmcs:.2f})")
            if ctrl is not None:
                ax.hist(ctrl, bins=bins, alpha=0.5, label=f"base vs base, other seed (MMCS {ctrl.mean():.2f})")
            ax.axvline(cmp.threshold, color="k", lw=0.8, ls="--")
            ax.set_xlabel("matched decoder cosine (Hungarian)")
            ax.set_ylabel("features")
            ax.set_title(hook, fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plots / "features_mmcs.png", dpi=120)
        plt.close(fig)
    if nulls:
        fig, axes = plt.subplots(1, len(nulls), figsize=(4.5 * len(nulls), 3.2), squeeze=False)
        for ax, (name, (null, share)) in zip(axes[0], nulls.items(), strict=True):
            ax.hist(null, bins=40, color="grey", alpha=0.7, label="random subsets")
            ax.axvline(share, color="C3", lw=2, label="LLM-flagged")
            ax.set_xlabel("share of |IRM weight| on the subset")
            ax.set_title(name, fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plots / "features_alignment.png", dpi=120)
        plt.close(fig)
    bars = [(f"{r} {h.split('.')[1]}", v["by_score"]) for h, d in section["activation_rate"].items()
            for r, v in d.items() if "by_score" in v]
    if bars:
        fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(bars), 3.5))
        x = np.arange(len(bars))
        for k, (grp, off) in enumerate((("flagged", -0.3), ("unflagged", 0.1))):
            for g, lab, dx in (("rate_high", "IRM high", 0.0), ("rate_low", "IRM low", 0.2)):
                vals = [b[1].get(grp, {}).get(g, np.nan) for b in bars]
                ax.bar(x + off + dx, vals, width=0.2, label=f"{grp}, {lab}", color=f"C{2 * k + int(dx > 0)}")
        ax.set_xticks(x, [b[0] for b in bars], fontsize=8)
        ax.set_ylabel("activation rate")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plots / "features_activation_rate.png", dpi=120)
        plt.close(fig)


def _render_scoring(sec: dict[str, Any], ci, fmt, md_table) -> str:
    """The report's paragraph on scored explanations: the verdict, pooled and per-feature scores."""
    sc = sec.get("scoring")
    if not sc:
        return ""
    if "skipped" in sc:
        return f"\nExplanations were not scored ({sc['skipped']}).\n"
    out = [f"\n**Scored explanations** ({', '.join(sc['methods'])}; {sc['n_score_snippets']} held-out activating "
           f"snippets per feature from {sc['score_quantiles']} activation-quantile bins and as many non-activating "
           f"ones; predictions from {'calibrated log-odds' if sc['mode'] == 'logprobs' else 'written 1/0 answers'}; "
           f"{sc['n_prompts']} prompts, {fmt(sc.get('seconds'), 1)} s). **{sc['verdict']}**"]
    if sc.get("logprobs_unavailable"):
        out.append(f" Token log-probabilities were not available: {sc['logprobs_unavailable']}")
    out.append(" Only labels of explanations above chance count in the IRM checks below.\n\n")
    out.append(md_table(["method", "balanced accuracy [95% Wilson]", "AUROC [95% bootstrap]", "snippets"],
                        [[m, ci(v["balanced_accuracy"]), ci(v["auroc"]), v["n_pos"] + v["n_neg"]]
                         for m, v in sc["overall"].items()]))
    rows = []
    for f in sec.get("features", []):
        s = f.get("scores")
        if not s:
            continue
        row = [f["role"], f["feature"], (f["explanation"] or "").replace("|", "/")[:60]]
        for m in sc["methods"]:
            row += [ci(s[m]["balanced_accuracy"], 2), ci(s[m]["auroc"], 2)]
        row += [{True: "yes", False: "no"}.get(s.get("above_chance"), "n/a"), f.get("label")]
        rows.append(row)
    if rows:
        head = ["SAE", "feature", "explanation"]
        for m in sc["methods"]:
            head += [f"{m} bal. acc.", f"{m} AUROC"]
        out.append("\nPer feature:\n\n" + md_table(head + ["above chance", "label"], rows))
    return "".join(out)


# ----------------------------------------------------------------------------------------------
def _register_renderer() -> None:
    try:
        from irm.run.report import ci, fmt, md_table, renderer
    except ImportError:  # the report module is optional for this stage
        return

    def _img(run: Path, name: str, alt: str) -> str:
        return f"![{alt}](plots/{name})\n" if (run / "plots" / name).is_file() else ""

    @renderer("features", order=80)
    def _features(sec: dict[str, Any], run: Path) -> str:
        out = [f"SAEs on `{', '.join(sec['hooks'])}` ({sec['layer_choice']}), {sec['store']['rows']} token rows "
               f"of {sec['store']['n_texts']} texts ({', '.join(f'{k}: {v}' for k, v in sec['store']['texts_by_kind'].items())}); "
               f"stage wall time {fmt(sec.get('seconds'), 1)} s.\n\n"]
        rows = [[h, r, m["architecture"], m["d_sae"], m["explained_variance"], m["l0"], m["dead_share"],
                 m["n_eval_rows"], fmt(m["seconds"], 1)] for h, d in sec["saes"].items() for r, m in d.items()]
        out.append(md_table(["hook", "SAE", "arch", "d_sae", "explained var. (held out)", "L0", "dead share",
                             "eval rows", "s"], rows))
        if sec["mmcs"]:
            out.append("\nDictionary comparison (alive features; Hungarian matching):\n\n")
            out.append(md_table(["hook", "MMCS base vs tuned", "MMCS base vs base (seed)", "appeared", "vanished",
                                 "mean abs. firing-rate change"],
                                [[h, m["mmcs"], m.get("seed_control", {}).get("mmcs"), m["n_appeared"], m["n_vanished"],
                                  sec["activation_change"].get(h, {}).get("mean_abs_rate_change")]
                                 for h, m in sec["mmcs"].items()]))
            out.append(_img(run, "features_mmcs.png", "matched cosines"))
        ai = sec.get("autointerp", {})
        out.append(f"\nAutointerp with `{ai.get('llm')}`: {ai.get('n_features')} features, {ai.get('n_labelled')} "
                   f"labelled ({ai.get('parse', {}).get('n_failed')} replies did not parse), "
                   f"{ai.get('n_flagged')} flagged as related to {ai.get('reward_description')!r}")
        cl = ai.get("classify") or {}
        if cl.get("mode") == "calibrated":
            out.append(f" by calibrated scores (log-odds of '1' over '0' minus the content-free log-odds "
                       f"{fmt(cl.get('content_free_log_odds'))}); the labels the LLM wrote flagged "
                       f"{ai.get('n_flagged_generated')}")
        out.append(".\n")
        gt = sec.get("ground_truth")
        if gt:
            o = gt["overall"]
            out.append(f"\nLLM labels vs lexicon ground truth ({gt['definition']}; base rate of lexicon tokens "
                       f"{fmt(gt['base_rate'])}; {gt['n_relevant']} relevant features):\n\n")
            out.append(md_table(["", "precision [95% CI]", "recall [95% CI]", "accuracy", "tp/fp/fn/tn", "unknown"],
                                [[k, ci(v["precision"]), ci(v["recall"]), ci(v["accuracy"]),
                                  f"{v['tp']}/{v['fp']}/{v['fn']}/{v['tn']}", v["n_unknown"]]
                                 for k, v in [("all", o), *gt["by_role"].items(),
                                              *([("above-chance explanations only", gt["trusted"])]
                                                if "trusted" in gt else []),
                                              *([("written labels", gt["generated_labels"])]
                                                if "generated_labels" in gt else [])]]))
        out.append(_render_scoring(sec, ci, fmt, md_table))
        al = [[h, r, v["weight"].get("n_flagged"), v["weight"].get("n"), v["weight"].get("share"),
               v["weight"].get("baseline_mean"), v["weight"].get("p_value"), v["attribution"].get("share"),
               v["attribution"].get("p_value")] for h, d in sec.get("alignment", {}).items() for r, v in d.items()]
        if al:
            out.append("\nShare of the IRM direction on LLM-flagged features (among interpreted features) vs random "
                       "subsets of the same size:\n\n")
            out.append(md_table(["hook", "SAE", "flagged", "of", "weight share", "random mean", "p", "attribution share",
                                 "p (attr.)"], al))
            out.append(_img(run, "features_alignment.png", "alignment"))
            notes = [f"{h} {r}: {v['weight']['note']}" for h, d in sec.get("alignment", {}).items()
                     for r, v in d.items() if v["weight"].get("note")]
            if notes:
                out.append("\nNot tested: " + "; ".join(notes) + ".\n")
        gal = [[h, r, v["weight"].get("n_flagged"), v["weight"].get("n"), v["weight"].get("share"),
                v["weight"].get("baseline_mean"), v["weight"].get("p_value"), v["attribution"].get("share"),
                v["attribution"].get("p_value")]
               for h, d in sec.get("alignment_ground_truth", {}).items() for r, v in d.items()]
        if gal:
            out.append("\nThe same test with the lexicon ground truth instead of the LLM's labels (share of the IRM "
                       "direction on features that are *relevant*, vs random subsets of the same size):\n\n")
            out.append(md_table(["hook", "SAE", "relevant", "of", "weight share", "random mean", "p",
                                 "attribution share", "p (attr.)"], gal))
        ar = []
        for h, d in sec.get("activation_rate", {}).items():
            for r, v in d.items():
                for by in ("by_score", "by_abs_score"):
                    for grp in ("flagged", "unflagged"):
                        x = v.get(by, {}).get(grp, {})
                        if "diff" in x:
                            ar.append([h, r, by, grp, x["rate_high"], x["rate_low"],
                                       f"{fmt(x['diff'])} [{fmt(x['diff_low'])}, {fmt(x['diff_high'])}]", x["p_value"]])
        if ar:
            out.append("\nActivation rate on texts the IRM scores high vs low (top vs bottom third):\n\n")
            out.append(md_table(["hook", "SAE", "split", "features", "rate high", "rate low", "diff [95% CI]", "p"], ar))
            out.append(_img(run, "features_activation_rate.png", "activation rate"))
        feats = [f for f in sec.get("features", []) if f.get("label") == 1][:12]
        if feats:
            out.append("\nFlagged features (first 12):\n\n")
            out.append(md_table(["SAE", "feature", "selection", "IRM weight", "relevance", "explanation", "attribute",
                                 "explanation above chance"],
                                [[f["role"], f["feature"], f["selection"], f["irm_weight"], f["relevance"],
                                  (f["explanation"] or "").replace("|", "/")[:100], (f["attribute"] or "")[:40],
                                  {True: "yes", False: "no"}.get(f.get("explanation_above_chance"), "n/a")]
                                 for f in feats]))
        if sec.get("skipped"):
            out.append("\nSkipped: " + "; ".join(f"{s['what']} ({s['why']})" for s in sec["skipped"]) + ".\n")
        return "".join(out)


_register_renderer()
