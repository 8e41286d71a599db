"""The ``irm`` command line.

    irm run CONFIG              the main job: every stage, results.json + report + wandb run
    irm capture CONFIG          capture activations of the pair into a store
    irm tune CONFIG             RLHF-tune the base against the explicit RM (cached)
    irm explain CONFIG          contrastive explanations of reward comparisons
    irm score --rm SPEC ...     score words or (prompt, response) pairs with any RM (explicit or IRM)
    irm report RUN_DIR          rebuild a run's report.md from its results.json
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
    from irm.run.pipeline import run_experiment

    cfg = _load(args)
    # The IRMs are explained too, so the stages that build them run first.
    ctx = run_experiment(cfg, force=args.force,
                         only=["reward", "tune", "pair", "evaluate", "divergence", "irm", "contrastive", "report"])
    print(f"Results: {ctx.run.results_path}")
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
    e = with_config(sub.add_parser("explain", help="contrastive explanations of reward comparisons"))
    e.add_argument("--force", action="store_true")
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
