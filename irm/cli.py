"""The ``irm`` command line.

    irm run CONFIG              the main job: every stage, results.json + report + wandb run
    irm capture CONFIG          capture activations of the pair into a store
    irm tune CONFIG             RLHF-tune the base against the explicit RM (cached)
    irm explain CONFIG          contrastive explanations of reward comparisons (after the stages that build the IRMs)
    irm explain --rm SPEC [--rm SPEC ...] --comparisons FILE
                                the same for any RMs on any comparisons file, standalone (no other stage)
    irm score --rm SPEC ...     score words or (prompt, response) pairs with any RM (explicit or IRM)
    irm report RUN_DIR          rebuild a run's report.md from its results.json
    irm train-rm CONFIG         train an RM on human preference pairs ([train_rm]; cached)
    irm eval-rm --rm SPEC ...   any RM against the human-rated gold standard (pairwise accuracy, r, tau)
    irm store PATH              describe an activation store
    irm hooks MODEL             list a model's hook names
    irm config [SECTION]        list the config keys with their help

Any config key can be overridden: ``--set capture.batch_size=8 --set seed=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

__all__ = ["main"]


def _load(args) -> Any:
    from irm.run.config import load_config, parse_overrides

    return load_config(args.config, overrides=parse_overrides(args.set))


def _cmd_run(args) -> int:
    from irm.run.pipeline import run_experiment

    cfg = _load(args)
    ctx = run_experiment(cfg, force=args.force, only=args.only, skip=args.skip)
    print(f"Run directory: {ctx.run_path}")
    print(f"Results:       {ctx.run.results_path}")
    report = ctx.run_path / "report.md"
    if report.is_file():
        print(f"Report:        {report}")
    return 0


def _cmd_capture(args) -> int:
    from irm.run.pipeline import run_capture

    cfg = _load(args)
    if args.overwrite:
        cfg.capture.overwrite = True
    store = run_capture(cfg)
    print(f"Store: {store.path}  ({store.n_rows} rows, {len(store.hooks)} hooks, roles {store.roles})")
    return 0


def _cmd_tune(args) -> int:
    from irm.run.pipeline import run_experiment

    cfg = _load(args)
    ctx = run_experiment(cfg, force=args.force, only=["reward", "tune", "pair", "evaluate"])
    print(f"Tuned model: {ctx.state.get('tuned_checkpoint')}")
    print(f"Results:     {ctx.run.results_path}")
    return 0


def _cmd_explain(args) -> int:
    standalone = bool(args.rm)
    if args.config and standalone:
        raise ValueError("give either CONFIG (the pipeline's explicit RM and IRMs) or --rm SPEC ... (standalone), "
                         "not both")
    if not args.config and not standalone:
        raise ValueError("nothing to explain: give CONFIG, or --rm SPEC (e.g. --rm vader) with --comparisons FILE")
    if not standalone:
        flags = [f for f, v in (("--comparisons", args.comparisons), ("--out", args.out),
                                ("--fluency-model", args.fluency_model)) if v is not None]
        if flags:
            raise ValueError(f"{', '.join(flags)} go with --rm (standalone); with CONFIG set [contrastive] keys "
                             "instead, e.g. --set contrastive.source=FILE")
        from irm.contrastive.stage import check_contrastive_config
        from irm.run.pipeline import run_experiment

        cfg = _load(args)
        check_contrastive_config(cfg)  # a missing comparisons file fails now, not after 13 minutes of stages
        # The IRMs are explained too, so the stages that build them run first.
        ctx = run_experiment(cfg, force=args.force,
                             only=["reward", "tune", "pair", "evaluate", "divergence", "irm", "contrastive", "report"])
        print(f"Results: {ctx.run.results_path}")
        return 0
    from irm.contrastive.report import headline
    from irm.contrastive.standalone import explain_rms

    if args.set or args.force:
        raise ValueError("--set and --force go with CONFIG; standalone explain takes its options as flags")
    _, section = explain_rms(
        args.rm, args.comparisons or "sample", out=args.out or "runs/explain", prompt_field=args.prompt_field,
        chosen_field=args.chosen_field, rejected_field=args.rejected_field, split=args.split, limit=args.limit,
        attributes=args.attributes, fluency_model="none" if args.no_fluency else (args.fluency_model or "smollm2-135m-instruct"),
        max_perplexity_ratio=args.max_perplexity_ratio, semantic=args.semantic, seed=args.seed, cli=True)
    print("\n".join(headline(section)))
    print(f"Results: {section['results']}")
    print(f"Report:  {section['report']}")
    print(f"({section['seconds']:.1f} s)")
    return 0


def _cmd_score(args) -> int:
    from irm.implicit.score import read_pairs, score_pairs, score_words
    from irm.rewards import load_rm, parse_rm_spec

    for spec in args.rm:  # every spec checked before any model loads
        parse_rm_spec(spec)
    words = list(args.words or [])
    if args.words_file:
        p = args.words_file
        if not os.path.isfile(p):
            raise FileNotFoundError(f"--words-file {os.path.abspath(p)} does not exist (one word per line).")
        words += [w.strip() for w in open(p, encoding="utf-8") if w.strip() and not w.startswith("#")]
    if bool(words) == bool(args.pairs):
        raise ValueError("irm score needs either words (--words W [W ...] / --words-file F) or --pairs F.jsonl.")
    pairs = read_pairs(args.pairs, prompt_field=args.prompt_field, response_field=args.response_field) \
        if args.pairs else None
    rms = [load_rm(spec, device=args.device) if parse_rm_spec(spec)[0] in ("probe", "logratio") else load_rm(spec)
           for spec in args.rm]
    rows = score_pairs(rms, *pairs) if pairs else score_words(rms, words, templates=args.templates)
    text = "\n".join(json.dumps(r) for r in rows) + "\n"
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"Scores: {args.out} ({len(rows)} rows)")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_report(args) -> int:
    from irm.run.report import write_report

    print(f"Report: {write_report(args.run_dir)}")
    return 0


def _cmd_store(args) -> int:
    from irm.activations.store import ActivationStore

    store = ActivationStore(args.path, allow_incomplete=True)
    m = store.manifest
    print(repr(store))
    print(json.dumps({k: m[k] for k in ("models", "positions", "dtype", "dataset", "n_shards", "complete")
                      if k in m}, indent=2))
    bad = store.verify() if args.verify else []
    if args.verify:
        print("verify:", "all shards match their sha256" if not bad else f"corrupt shards {bad}")
    return 1 if bad else 0


def _cmd_hooks(args) -> int:
    from irm.models import load_model

    m = load_model(args.model)
    names = sorted(m.bridge.hook_dict)
    if args.filter:
        names = [n for n in names if args.filter in n]
    print("\n".join(names))
    return 0


def _cmd_config(args) -> int:
    import dataclasses

    from irm.run.config import CORE_SECTIONS, SECTIONS
    from irm.run.registry import import_stages

    import_stages()
    sections = {**CORE_SECTIONS, **SECTIONS}
    wanted = [args.section] if args.section else list(sections)
    for name in wanted:
        if name not in sections:
            raise SystemExit(f"No section {name!r}; sections: {sorted(sections)}")
        print(f"[{name}]")
        for f in dataclasses.fields(sections[name]):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            print(f"  {f.name} = {default!r}\n      {f.metadata.get('help', '')}")
    return 0


def _cmd_train_rm(args) -> int:
    from irm.run.pipeline import run_experiment

    cfg = _load(args)
    tcfg = cfg.section("train_rm")
    tcfg.enabled = True  # the command is the request
    if args.no_eval:
        tcfg.evaluate = False
    ctx = run_experiment(cfg, force=args.force, only=["train_rm"])
    sec = json.loads(ctx.run.results_path.read_text()).get("train_rm") or {}
    ev = sec.get("human_eval")
    if ev:
        from irm.rewards.humans import human_eval_rows

        header, rows = human_eval_rows(ev)
        print("\t".join(header))
        print("\n".join("\t".join(str(c) for c in r) for r in rows))
    print(f"Reward model: {sec.get('checkpoint')}  ({'reused' if sec.get('reused') else 'trained'}; "
          f"load it with [reward] kind = \"classifier\", params = {{ path = \"{sec.get('checkpoint')}\", "
          f"input_format = \"concat\" }})")
    print(f"Results:      {ctx.run.results_path}")
    return 0


def _cmd_eval_rm(args) -> int:
    from pathlib import Path

    from irm.data.human import CORPORA, SPLITS, load_human_corpora
    from irm.rewards import load_rm, parse_rm_spec
    from irm.rewards.humans import VaderAnalyzerRM, evaluate_rms, human_eval_rows, plot_human_eval

    corpora = args.corpora or list(CORPORA)
    bad = [c for c in corpora if c not in CORPORA]
    if bad:
        raise ValueError(f"--corpora {bad}: the corpora are {list(CORPORA)}")
    if args.split not in SPLITS:
        raise ValueError(f"--split {args.split!r}: one of {list(SPLITS)}")
    if args.n_boot < 1 or args.margin < 0:
        raise ValueError("--n-boot must be >= 1 and --margin >= 0")
    kinds = {}
    for spec in args.rm:  # every spec checked, and the data found, before any model loads
        kinds[spec] = "vader_analyzer" if spec == "vader_analyzer" else parse_rm_spec(spec)[0]
    load_human_corpora(corpora)
    rms, uses = {}, {}
    for spec in args.rm:
        kind = kinds[spec]
        name = spec if spec not in rms else f"{spec}#{len(rms)}"
        if kind == "vader_analyzer":
            rms[name] = VaderAnalyzerRM()
        elif kind in ("probe", "logratio"):
            rms[name] = load_rm(spec, device=args.device)
        else:
            rms[name] = load_rm(spec)
        # LLM-based IRMs read a context: the corpus's instruction; text classifiers and lexicons the text alone.
        uses[name] = args.instruction if args.instruction is not None else kind in ("probe", "logratio")
    res = evaluate_rms(rms, corpora, split=args.split, margin=args.margin, n_boot=args.n_boot, seed=args.seed,
                       use_instruction=uses)
    header, rows = human_eval_rows(res)
    print("\t".join(header))
    print("\n".join("\t".join(str(c) for c in r) for r in rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(f"Results: {args.out}")
    if args.plot:
        print(f"Plot:    {plot_human_eval(res, args.plot)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="irm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    sub = p.add_subparsers(dest="cmd", required=True)

    def with_config(sp):
        sp.add_argument("config", help="experiment TOML file, e.g. experiments/default.toml")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted), e.g. --set capture.batch_size=8")
        return sp

    r = with_config(sub.add_parser("run", help="the main job: every stage"))
    r.add_argument("--force", action="store_true", help="recompute cached results (e.g. retune)")
    r.add_argument("--only", nargs="+", help="run only these stages")
    r.add_argument("--skip", nargs="+", help="skip these stages")
    r.set_defaults(fn=_cmd_run)
    c = with_config(sub.add_parser("capture", help="capture activations into a store"))
    c.add_argument("--overwrite", action="store_true", help="replace a store made with other settings")
    c.set_defaults(fn=_cmd_capture)
    t = with_config(sub.add_parser("tune", help="RLHF-tune the base against the explicit RM"))
    t.add_argument("--force", action="store_true", help="retrain even if a cached tuned model exists")
    t.set_defaults(fn=_cmd_tune)
    e = sub.add_parser("explain", help="contrastive explanations of reward comparisons",
                       description="irm explain CONFIG: the pipeline's RMs (runs the stages that build the IRMs "
                       "first). irm explain --rm SPEC [--rm SPEC ...] --comparisons FILE: any RMs on any "
                       "comparisons, standalone.")
    e.add_argument("config", nargs="?", help="experiment TOML file (omit with --rm)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted), e.g. --set contrastive.n_comparisons=10")
    e.add_argument("--force", action="store_true")
    e.add_argument("--rm", action="append", default=[], metavar="SPEC",
                   help="an RM to explain (repeatable): vader, a lexicon .tsv, classifier:DIR_OR_HUB?label=X, "
                        "probe:DIR, logratio:RUN_DIR")
    e.add_argument("--comparisons", metavar="FILE",
                   help="comparisons .jsonl/.csv/.json/.parquet, a hub dataset, or 'sample' (default)")
    e.add_argument("--prompt-field", default="prompt", help="prompt column ('' splits HH-RLHF dialogues)")
    e.add_argument("--chosen-field", default="chosen", help="chosen-response column")
    e.add_argument("--rejected-field", default="rejected", help="rejected-response column")
    e.add_argument("--split", default="train", help="split of a hub dataset")
    e.add_argument("--limit", type=int, default=30, help="comparisons to explain (default 30)")
    e.add_argument("--attributes", nargs="+", help="attributes to perturb (default: all)")
    e.add_argument("--out", help="output directory for results.json, contrastive.md, plots/ (default runs/explain)")
    e.add_argument("--fluency-model", metavar="MODEL",
                   help="LM whose perplexity screens perturbations (default smollm2-135m-instruct; 'none': off)")
    e.add_argument("--no-fluency", action="store_true", help="skip the fluency check (same as --fluency-model none)")
    e.add_argument("--max-perplexity-ratio", type=float, default=2.5,
                   help="drop perturbations whose perplexity exceeds this times the original's (default 2.5)")
    e.add_argument("--semantic", action="store_true", help="semantic distances with all-MiniLM-L6-v2 (slower)")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(fn=_cmd_explain)
    sc = sub.add_parser("score", help="score words or (prompt, response) pairs with any RM, explicit or implicit")
    sc.add_argument("--rm", action="append", required=True, metavar="SPEC",
                    help="an RM spec: vader, PATH.tsv, classifier:DIR_OR_HUB, probe:RUN/irm_probe, logratio:RUN "
                         "(repeat for several)")
    sc.add_argument("--words", nargs="+", metavar="W", help="words to score")
    sc.add_argument("--words-file", help="a file with one word per line")
    sc.add_argument("--pairs", help="a .jsonl or .csv of (prompt, response) rows")
    sc.add_argument("--prompt-field", default="prompt")
    sc.add_argument("--response-field", default="response")
    sc.add_argument("--templates", default="reviews",
                    help="word templates for RMs without a word table: reviews, everyday, assistant, or a file")
    sc.add_argument("--device", default="cpu", help="device of the models a probe or log-ratio RM runs")
    sc.add_argument("--out", help="write JSON lines here instead of stdout")
    sc.set_defaults(fn=_cmd_score)
    rp = sub.add_parser("report", help="rebuild report.md of a run directory from its results.json")
    rp.add_argument("run_dir")
    rp.set_defaults(fn=_cmd_report)
    s = sub.add_parser("store", help="describe an activation store")
    s.add_argument("path")
    s.add_argument("--verify", action="store_true", help="check every shard against its sha256")
    s.set_defaults(fn=_cmd_store)
    h = sub.add_parser("hooks", help="list a model's hook names")
    h.add_argument("model", help="model spec, e.g. smollm2-135m-instruct or tiny-llama")
    h.add_argument("--filter", help="only names containing this")
    h.set_defaults(fn=_cmd_hooks)
    g = sub.add_parser("config", help="list config sections and keys with their help")
    g.add_argument("section", nargs="?")
    g.set_defaults(fn=_cmd_config)
    tr = with_config(sub.add_parser("train-rm", help="train an RM on the human-rated gold standard ([train_rm])"))
    tr.add_argument("--force", action="store_true", help="retrain even if a cached RM exists")
    tr.add_argument("--no-eval", action="store_true", help="skip the evaluation against the humans")
    tr.set_defaults(fn=_cmd_train_rm)
    ev = sub.add_parser("eval-rm", help="any RM against the human-rated gold standard (Hutto & Gilbert 2014)")
    ev.add_argument("--rm", action="append", required=True, metavar="SPEC",
                    help="vader_analyzer (VADER's own analyzer), vader, PATH.tsv, classifier:DIR?input_format=concat, "
                         "probe:RUN/irm_probe, logratio:RUN (repeat for several)")
    ev.add_argument("--corpora", nargs="+", help="tweets movies amazon nyt (default: all)")
    ev.add_argument("--split", default="test", help="train, validation or test (default test)")
    ev.add_argument("--margin", type=float, default=0.5, help="pairs whose mean ratings differ by >= this (default 0.5)")
    ev.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the CIs (default 1000)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--instruction", action=argparse.BooleanOptionalAction, default=None,
                    help="score each text as the response to its corpus's instruction (default: only for probe and "
                         "logratio IRMs)")
    ev.add_argument("--device", default="cpu", help="device of the models a probe or log-ratio RM runs")
    ev.add_argument("--out", help="write the results as JSON here")
    ev.add_argument("--plot", help="write a bar plot (PNG) here")
    ev.set_defaults(fn=_cmd_eval_rm)
    return p


def main(argv: list[str] | None = None) -> int:
    from irm.core.log import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging("DEBUG" if args.verbose else ("WARNING" if args.quiet else "INFO"))
    if args.quiet:
        os.environ["IRM_PROGRESS"] = "0"
    from irm.activations.store import StoreError
    from irm.run.config import ConfigError

    try:
        return int(args.fn(args) or 0)
    except (ConfigError, StoreError, FileExistsError, FileNotFoundError, KeyError, ValueError) as e:
        # Bad input: say what was wrong and how to fix it, without a traceback.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"irm {args.cmd}: error: {msg}", file=sys.stderr)
        if args.verbose:
            raise
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
