"""Activation capture with ``share_prefix=True``: this checkout against another one (by default the
commit before the prefix tree, whose capture shared only each record's prompt), side by side.

Two workloads, each timed in fresh processes that alternate between the two checkouts (this VM is
noisy, so only ratios measured in one run are compared):

* ``contrastive``: the probe IRM scoring the contrastive stage's kind of texts: the packaged sample's
  comparisons, every programmatic perturbation of chosen and rejected (all attributes, both
  directions) and a neutral random twin of each, through a run's saved probe on its pair, with the
  log-probability memo on (as in the stage).
* ``words``: the ``irm`` stage's capture: word templates for lexicon words, every layer's residual
  stream and the words' log-probabilities, both models.

    git worktree add /tmp/old_irm <commit>
    python benchmarks/bench_share_tree.py --run runs/default --other /tmp/old_irm
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_workloads(run: Path, n_words: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from irm.contrastive.attributes import ATTRIBUTES
    from irm.contrastive.comparisons import load_comparisons
    from irm.contrastive.perturb import ProgrammaticGenerator, RandomSubstitution, neutral_vocabulary
    from irm.rewards import load_rm

    comps = load_comparisons("sample")
    gen = ProgrammaticGenerator()
    rnd = RandomSubstitution(neutral_vocabulary([load_rm("vader")])[0])
    rng = np.random.default_rng(0)
    pairs: dict[tuple[str, str], None] = {}
    texts = [c.chosen for c in comps] + [c.rejected for c in comps]
    prompts = [c.prompt for c in comps] * 2
    for p, t in zip(prompts, texts, strict=True):
        pairs[(p, t)] = None
    for a in list(ATTRIBUTES):
        for d in (1, -1):
            for p, pert in zip(prompts, gen.perturb(texts, a, d, prompts=prompts, seed=0), strict=True):
                if pert.ok:
                    pairs[(p, pert.text)] = None
                    twin = rnd.perturb_like(pert, rng)
                    if twin.ok:
                        pairs[(p, twin.text)] = None
    from irm.rewards.lexicon import load_lexicon, vader_lexicon_path

    lex = load_lexicon(vader_lexicon_path())
    words = [w for w in sorted(lex) if w.isalpha()][::7][:n_words]
    return {"contrastive": [list(k) for k in pairs], "words": words, "run": str(run)}


CHILD = r"""
import json, sys, time, tempfile
from pathlib import Path
spec = json.loads(sys.argv[1])
import torch
torch.set_num_threads(2)
from irm.models import load_model
from irm.models.pair import ModelPair
run = Path(spec["run"])
pair = ModelPair(load_model("smollm2-135m-instruct"), load_model(str(run / "tuned")))
out = {}
if spec["workload"] == "contrastive":
    from irm.implicit.probe_rm import ProbeRM
    from irm.models.memo import sharing_logprobs
    probe = ProbeRM.load(run / "irm_probe", pair)
    ps = [p for p, _ in spec["texts"]]
    rs = [r for _, r in spec["texts"]]
    t0 = time.perf_counter()
    with sharing_logprobs(pair.base, pair.tuned):
        s = probe.score(ps, rs)
    out["seconds"] = time.perf_counter() - t0
    out["scores"] = [float(x) for x in s]
else:
    from irm.activations.capture import capture_activations
    from irm.implicit.words import word_records
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(pair.base.n_layers)]
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        st = capture_activations({"base": pair.base, "tuned": pair.tuned}, word_records(spec["words"]),
                                 Path(d) / "s", hooks=hooks, positions="target", batch_size=64, shard_size=1024,
                                 max_length=32, logprobs=True, share_prefix=True)
        out["seconds"] = time.perf_counter() - t0
        out["scores"] = st.logprobs("tuned").tolist()[:200]
print("RESULT " + json.dumps(out))
"""


def run_child(checkout: Path, spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, cwd=str(checkout),
                         capture_output=True, text=True, check=False)
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"child in {checkout} failed:\n{res.stderr[-3000:]}")
    return json.loads(line[7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "default", help="a run with tuned/ and irm_probe/")
    ap.add_argument("--other", type=Path, required=True, help="the other checkout (e.g. a git worktree)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--words", type=int, default=400, help="lexicon words in the words workload")
    ap.add_argument("--workloads", nargs="+", default=["contrastive", "words"])
    ap.add_argument("--max-texts", type=int, default=800, help="contrastive texts (every k-th, in order)")
    args = ap.parse_args()
    w = build_workloads(args.run.resolve(), args.words)
    step = max(1, -(-len(w["contrastive"]) // args.max_texts))
    w["contrastive"] = w["contrastive"][::step]
    print(f"contrastive: {len(w['contrastive'])} texts; words: {len(w['words'])} words")
    for name in args.workloads:
        spec = {"workload": name, "run": w["run"], "texts": w["contrastive"], "words": w["words"]}
        times: dict[str, list[float]] = {"this": [], "other": []}
        scores = {}
        for _ in range(args.reps):
            for side, checkout in (("this", ROOT), ("other", args.other.resolve())):
                r = run_child(checkout, spec)
                times[side].append(r["seconds"])
                scores[side] = r["scores"]
        import numpy as np

        diff = float(np.max(np.abs(np.asarray(scores["this"]) - np.asarray(scores["other"]))))
        t, o = min(times["this"]), min(times["other"])
        fmt = ", ".join
        print(f"{name}: this {fmt(f'{x:.1f}' for x in times['this'])} s, other {fmt(f'{x:.1f}' for x in times['other'])} s; "
              f"best {t:.1f} vs {o:.1f} s = {o / t:.2f}x faster; max |score diff| {diff:.2g}")


if __name__ == "__main__":
    main()
