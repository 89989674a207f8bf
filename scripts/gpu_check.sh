#!/usr/bin/env bash
# The GPU check, for the few minutes a machine with one NVIDIA GPU is lent: at most 300 s in all (the sum of the
# stage budgets below), whatever hangs.
#   preflight        torch sees a CUDA device (prints it); otherwise stop at once, writing nothing;
#   tests            the GPU-marked tests (tests/utils/test_gpu_checks.py, test_precision_steps.py and
#                    test_gpu_cluster_checks.py: NCCL group of one rank, SyncBN conversion, fp16 loss scaling, fp16/bf16
#                    training against fp32, fused SGD against foreach; an approximate memory schedule leaves the model
#                    trainable, the evaluation budget counts the allocator's cached blocks, a checkpoint's CUDA random
#                    state restores where fewer GPUs are visible); their CPU cases run in the default suite; a skipped
#                    test counts as a failure here;
#   train_fp16       python -m scripts.dev.gpu_probe_train preempt: train.py (tiny demo model) under torchrun, 2 ranks on
#                    the one GPU through gloo, fp16, channels-last, SyncBN (checked to synchronise); SIGUSR1 after
#                    iteration 3 (checkpoint, exit 75), then the same command resumes: every iteration logged once;
#   train_bf16       the same in bf16, straight through;
#   eval             python -m scripts.dev.gpu_probe_eval: eval.py under a memory budget that forces a planned schedule;
#                    torch.cuda.max_memory_allocated against the planner's predicted peak;
#   bench            python -m scripts.bench.multiscale --device cuda --full --precision fp16: the training-step table (images/s,
#                    MFU, phases) of both models at 1024x1024 x 2 in the recipes' precision (the step the data loader
#                    must keep up with), and the recipe section (FLOPs; Mapillary evaluation memory, measured);
#   data_cityscapes, data_mapillary
#                    python -m scripts.bench.data for the two recipes' training items (Cityscapes: PNG, 1024x2048
#                    crop; Mapillary: JPEG 4000x3000, long edge 2177, 1024x1024 crop, blur), Pillow-exact; with the
#                    recipes' data.num_workers, the loader's images/s against what the measured HRNet-OCR step consumes;
#   summary          one JSON with every stage's result, limit and seconds and everything measured: OUT (default
#                    gpu_check.json).
# Each stage runs under `timeout` with its budget: TERM a few seconds before the budget, KILL at it, and then any
# process the stage left behind (torchrun starts its workers in sessions of their own) is killed by its id. A stage
# that runs out is named in the output and in the JSON ("timeout"). The checks (tests, train_*, eval) are soft: a
# failing one is reported and the measurements still run (a lent GPU's minutes are few); a failing measurement stops
# the stages after it. Either way the JSON is written and the script exits 1, naming every failure.
#
#   scripts/gpu_check.sh [OUT.json]
#   scripts/gpu_check.sh --dry-run [OUT.json]   # on a CPU: the same stages, tiny sizes, GPU tests skipped, budgets x20
# GPU_CHECK_LIMIT_<stage>=SECONDS replaces a stage's budget (the tests of this script use tiny ones).
set -euo pipefail
cd "$(dirname "$0")/.."

# Stage budgets in seconds; they add up to 300. Each comment is the estimate on an H100 host (16 cores) and why; none
# is measured yet (no GPU has run this project), so the first lent GPU's JSON is what to set them from. The
# estimates add up to ~200 s warm (about 3.5 minutes), ~210 s on a fresh machine; the budgets leave each stage
# at least 1.3x its estimate.
declare -A BUDGET=(
  [preflight]=25        # ~4 s warm: import torch (~2 s), CUDA context and a first kernel (~1-2 s); up to ~15 s on a
                        # fresh machine, whose first import reads torch's CUDA libraries (~2 GB) from disk
  [tests]=40            # ~30 s: pytest start-up and imports (~6 s), 10 GPU cases on tiny models (~1-2 s each with
                        # cuDNN autotuning), an NCCL group (~2 s), one restricted-GPU subprocess (~5 s)
  [train_fp16]=50       # ~35 s: 2 torchrun launches of ~17 s: start-up and imports (~6 s), CUDA and gloo (~2 s), the
                        # training-step memory trace (~2 s, CPU), 5 tiny steps with cuDNN autotuning (~3 s), checkpoint,
                        # final validation at 2 scales (~2 s)
  [train_bf16]=25       # ~17 s: one such launch
  [eval]=25             # ~15 s: imports (~4 s), 2 images of 512x1024 generated (~1 s), the ladder planned twice on
                        # fake tensors (~5 s, CPU), eval.py at scales 0.5, 1, 2 (~3 s)
  [bench]=90            # ~70 s: 2 x 3 full-width models built (~6 s), cuDNN autotuning of their first steps at
                        # 1024x1024 (~10-15 s per model), FLOP counts, 1 + 2 rounds of 5 timed calls (~3 s per model),
                        # the recipe section on fake tensors (~10 s, CPU) and its measured Mapillary evaluation (~10 s)
  [data_cityscapes]=20  # ~10 s: 4 PNG scenes generated (~3 s), 8 items through two pipelines at ~0.3 s each (~5 s)
  [data_mapillary]=20   # ~15 s: 2 JPEG scenes of 4000x3000 generated (~8 s), 6 items through two pipelines (~5 s)
  [summary]=5           # ~3 s: the JSON, from the stages' files
)

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY=1
  shift
fi
OUT=${1:-gpu_check.json}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python}
SCALE=$((DRY ? 20 : 1))  # a shared 2-core CPU does a GPU's seconds of this work in minutes; the dry run checks the flow

fail() {
  echo "gpu_check: FAILED: $*" >&2
  exit 1
}

FAILED=()   # every failure, in order, reported at the end
STOPPED=""  # set by a failing hard stage: the stages after it do not run

# reap TOKEN: kill, by id, every process whose environment carries this stage's token (only this script's stage
# sets it): what a stage leaves running after its time is up, such as torchrun's workers in their own sessions.
reap() {
  local file pid
  for file in $(grep -lsz "^GPU_CHECK_STAGE=$1\$" /proc/[0-9]*/environ || true); do
    pid=${file#/proc/}
    pid=${pid%/environ}
    kill -KILL "$pid" 2>/dev/null && echo "gpu_check: killed process $pid, left running by stage '$2'" >&2 || true
  done
}

# stage [--soft] NAME COMMAND...: COMMAND under NAME's budget; output kept in $WORK/NAME.log; the result, limit and
# seconds go to $WORK/stages.tsv. A failure stops the stages after it, or with --soft only goes into FAILED.
stage() {
  local soft=0
  if [[ $1 == --soft ]]; then
    soft=1
    shift
  fi
  local name=$1
  shift
  local override="GPU_CHECK_LIMIT_$name"
  local limit=${!override:-$((${BUDGET[$name]:?"no budget for stage $name"} * SCALE))}
  limit=$((limit < 2 ? 2 : limit))  # TERM at limit - grace must come after 0 s (timeout 0 would never stop it)
  if [[ -n $STOPPED ]]; then
    printf '%s\t%s\t0\tnot run: %s\n' "$name" "$limit" "$STOPPED" >> "$WORK/stages.tsv"
    return 0
  fi
  local grace=$((limit >= 10 ? 3 : 1))  # between TERM (a chance to exit cleanly) and KILL
  echo "== $name (limit ${limit}s): $*"
  local start=${EPOCHREALTIME/./} rc=0 result=ok why=""  # microseconds
  # tee in a process substitution: the stage's end does not wait for leftover writers (they are reaped below)
  GPU_CHECK_STAGE="$$.$name" timeout --kill-after="$grace" "$((limit - grace))" "$@" \
    > >(tee "$WORK/$name.log") 2>&1 || rc=$?
  reap "$$.$name" "$name"
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    result="timeout: ran past its ${limit}s limit"
    why="stage '$name' ran past its ${limit}s limit"
  elif [[ $rc -ne 0 ]]; then
    result="failed: exit $rc"
    why="stage '$name' exited with $rc (its output is above)"
  fi
  local took=$((${EPOCHREALTIME/./} - start))
  printf '%s\t%s\t%d.%02d\t%s\n' "$name" "$limit" "$((took / 1000000))" "$((took / 10000 % 100))" "$result" \
    >> "$WORK/stages.tsv"
  if [[ -z $why ]]; then
    return 0
  fi
  if [[ $name == preflight ]]; then
    fail "$why"  # no device: nothing to measure, nothing written
  elif [[ $soft -eq 1 ]]; then
    echo "gpu_check: $why; the measurements go on, and the check fails at the end" >&2
  else
    echo "gpu_check: $why; the stages after it do not run" >&2
    STOPPED="stage '$name' failed"
  fi
  FAILED+=("$why")
}

if [[ $DRY -eq 1 ]]; then
  DEVICE=cpu
  DATA_CS=(--images 2 --repeats 1 --width 256 --height 128 --crop 128,256)
  DATA_MVD=(--images 2 --repeats 1 --width 400 --height 300 --pre-size 217 --crop 128)
  BENCH=(--width tiny --crop 64x64 --eval-size 32x48 --precision fp16 --rounds 1 --warmup 0 --sections train
         --out "$WORK/bench.json")
  EVAL_SIZE=64x128
else
  DEVICE=cuda
  DATA_CS=(--images 4 --repeats 2 --crop 1024,2048)
  DATA_MVD=(--images 2 --repeats 3 --width 4000 --height 3000 --pre-size 2177 --crop 1024)
  BENCH=(--device cuda --full --precision fp16 --rounds 2 --sections train recipe --out "$WORK/bench.json")
  EVAL_SIZE=512x1024
fi

stage preflight "$PY" - "$DEVICE" <<'EOF'
import sys
import torch
if sys.argv[1] == "cuda":
    if not torch.cuda.is_available():
        sys.exit(f"no CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees none; "
                 "run on a machine with an NVIDIA GPU, or use --dry-run on a CPU")
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}; "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    torch.ones(1, device="cuda").add_(1)  # a first kernel: the driver and the runtime work
else:
    print(f"dry run on the CPU: torch {torch.__version__}")
EOF

stage --soft tests "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/utils/test_gpu_checks.py \
  tests/utils/test_precision_steps.py tests/utils/test_gpu_cluster_checks.py -rs --junitxml="$WORK/tests.xml"
if [[ $DRY -eq 0 ]] && grep -q '<skipped' "$WORK/tests.xml" 2>/dev/null; then
  echo "gpu_check: stage 'tests': GPU tests were skipped on a machine with CUDA (reasons above)" >&2
  FAILED+=("stage 'tests': GPU tests were skipped on a machine with CUDA")
fi
stage --soft train_fp16 "$PY" -m scripts.dev.gpu_probe_train preempt --precision fp16 --root "$WORK/train" \
  --json "$WORK/train_fp16.json"
stage --soft train_bf16 "$PY" -m scripts.dev.gpu_probe_train straight --precision bf16 --root "$WORK/train" \
  --json "$WORK/train_bf16.json"
stage --soft eval "$PY" -m scripts.dev.gpu_probe_eval --root "$WORK/eval" --size "$EVAL_SIZE" --json "$WORK/eval.json"

stage bench "$PY" -m scripts.bench.multiscale "${BENCH[@]}"
stage data_cityscapes env OMP_NUM_THREADS=1 "$PY" -m scripts.bench.data "${DATA_CS[@]}" --no-gblur \
  --resample pil --no-centroids --json "$WORK/data_cityscapes.json"
stage data_mapillary env OMP_NUM_THREADS=1 "$PY" -m scripts.bench.data --dataset mapillary "${DATA_MVD[@]}" \
  --resample pil --no-centroids --json "$WORK/data_mapillary.json"

STOPPED=""  # the summary runs whatever failed before it: the JSON says what ran, what failed, what ran out
stage summary "$PY" - "$WORK" "$OUT" "$DRY" ${FAILED[@]+"${FAILED[@]}"} <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET
work, out, dry, failed = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4:]


def load(name):
    """A stage's JSON, or None when the stage did not write it (it failed, ran out of time or did not run)."""
    if not os.path.exists(f"{work}/{name}"):
        return None
    with open(f"{work}/{name}") as f:
        return json.load(f)


tests = None  # pytest wrote no report (it did not start, or was killed)
if os.path.exists(f"{work}/tests.xml"):
    suite = ET.parse(f"{work}/tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    tests = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
stages = {}
for line in open(f"{work}/stages.tsv"):
    name, limit, seconds, result = line.rstrip("\n").split("\t")
    stages[name] = {"result": result, "limit_s": int(limit), "seconds": float(seconds)}
with open(f"{work}/preflight.log") as f:
    device = (f.read().strip().splitlines() or ["(the preflight printed nothing)"])[-1]
bench = load("bench.json")
train = {r["model"]: r for r in (bench or {}).get("train", [])}
sys.path.insert(0, ".")
from utils.config import load_config
# The HRNet-OCR step measured at 1024x1024 x 2 (the Mapillary recipe); the Cityscapes recipe's 1024x2048 x 1 crop
# has as many pixels, so its step is taken to consume half the images per second.
step = train.get("hmsa_ocrnet_hrnet_w48")
data = {}
for name, config, per_step in (("cityscapes", "configs/cityscapes/hmsa_ocrnet_hrnet_w48_1024x2048.yaml", 0.5),
                               ("mapillary", "configs/mapillary/hmsa_ocrnet_hrnet_w48_1024x1024.yaml", 1.0)):
    measured = load(f"data_{name}.json")
    if measured is None or step is None:
        continue
    workers = load_config(config).data.num_workers
    loader = workers * measured["pil_img_per_s_per_worker"]
    consumed = per_step * step["images_per_s"]
    data[name] = {"per_worker_img_per_s": measured["pil_img_per_s_per_worker"], "workers": workers,
                  "loader_img_per_s": loader, "step_img_per_s": consumed, "headroom": loader / consumed,
                  "measured": measured}
    basis = "measured" if per_step == 1.0 else "from the 1024x1024 x 2 step at equal pixels"
    data[name]["step_basis"] = basis
    print(f"data {name}: {workers} workers x {measured['pil_img_per_s_per_worker']:.2f} img/s = {loader:.1f} img/s "
          f"against {consumed:.2f} img/s per GPU step ({basis}): {loader / consumed:.2f}x (goal >= 2x)")
evaluation = load("eval.json")
result = {"dry_run": dry, "device": bench["machine"]["device"] if bench else device, "stages": stages,
          "timed_out": [n for n, s in stages.items() if s["result"].startswith("timeout")], "failed": failed,
          "tests": tests, "train": {p: load(f"train_{p}.json") for p in ("fp16", "bf16")}, "eval": evaluation,
          "bench": bench, "data": data}
with open(out, "w") as f:
    json.dump(result, f, indent=1)
for name, s in stages.items():
    print(f"stage {name}: {s['result']} ({s['seconds']:.1f} s of {s['limit_s']} s)")
for name, r in train.items():
    print(f"{name}: {r['images_per_s']:.2f} img/s, MFU {r['mfu'] if r['mfu'] is None else format(r['mfu'], '.1%')} "
          f"at {r['crop'][0]}x{r['crop'][1]} x {r['batch']}")
for r in (bench or {}).get("recipe", {}).get("memory", []):
    if r["how"].startswith("measured"):
        print(f"{r['case']} {r['precision']}: peak {r['peak_gib']:.2f} GiB (measured)")
if evaluation and evaluation["measured_over_predicted"] is not None:
    print(f"eval.py under a planned schedule: measured peak {evaluation['measured_peak'] / 2**20:.1f} MiB, planned "
          f"{evaluation['predicted_peak'] / 2**20:.1f} MiB: {evaluation['measured_over_predicted']:.2f}x")
print(f"gpu_check: {'measured, with failures (below)' if failed else 'OK'}, wrote {out}")
EOF
if [[ ${#FAILED[@]} -gt 0 ]]; then
  fail "$(printf '%s; ' "${FAILED[@]}")the measurements are in $OUT"
fi
