#!/usr/bin/env bash
# The GPU check, for the few minutes a machine with one NVIDIA GPU is lent (at most 5 minutes in all):
#   1. pre-flight: torch sees a CUDA device (prints it); otherwise stop at once;
#   2. the GPU-marked tests (tests/utils/test_gpu_checks.py and test_precision_steps.py: NCCL group of one rank,
#      SyncBN, fp16 loss scaling, fp16/bf16 training against fp32, fused SGD against foreach; their CPU cases run
#      in the default test suite); a skipped test counts as a failure here;
#   3. python -m scripts.bench --device cuda --full --precision fp16: the training-step table (images/s, MFU,
#      phases) of both models at 1024x1024 x 2 in the recipes' precision (their run.precision is fp16, so that is
#      the step the data loader must keep up with), and the recipe section (FLOPs; Mapillary evaluation memory,
#      measured);
#   4. python -m scripts.bench_data for the two recipes' training items (Cityscapes: PNG, 1024x2048 crop; Mapillary:
#      JPEG 4000x3000, long edge 2177, 1024x1024 crop, blur), one worker per core, Pillow-exact; with the
#      recipes' data.num_workers, the loader's images/s against what the measured HRNet-OCR step consumes;
#   5. one JSON with everything: OUT (default gpu_check.json).
# Every stage has its own time limit. A failing stage stops the script at once, naming it; only the tests go on
# to the measurements (a lent GPU's minutes are few), and the script then fails at the end, naming them, with
# the measurements written.
#
#   scripts/gpu_check.sh [OUT.json]
#   scripts/gpu_check.sh --dry-run [OUT.json]   # on a CPU: the same stages, tiny models, the tests skipped
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY=1
  shift
fi
OUT=${1:-gpu_check.json}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python}

fail() {
  echo "gpu_check: FAILED: $*" >&2
  exit 1
}

FAILED=()  # failures of --soft stages, reported at the end

# stage [--soft] NAME SECONDS COMMAND...: runs COMMAND under a time limit; its output is kept in $WORK/NAME.log.
# A failure stops the script, or with --soft is kept in FAILED and the next stages run.
stage() {
  local soft=0
  if [[ $1 == --soft ]]; then
    soft=1
    shift
  fi
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS rc=0 why=""
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log" || rc=${PIPESTATUS[0]}
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    why="stage '$name' ran past its ${limit}s limit"
  elif [[ $rc -ne 0 ]]; then
    why="stage '$name' exited with $rc (its output is above)"
  fi
  if [[ -n $why && $soft -eq 0 ]]; then
    fail "$why"
  elif [[ -n $why ]]; then
    soft_failure "$why"
  fi
  echo "$name $((SECONDS - start))" >> "$WORK/stages.txt"
}

soft_failure() {
  echo "gpu_check: $1; the measurements go on, and the check fails at the end" >&2
  FAILED+=("$1")
}

if [[ $DRY -eq 1 ]]; then
  DEVICE=cpu
  DATA_CS=(--images 2 --repeats 1 --width 256 --height 128 --crop 128,256)
  DATA_MVD=(--images 2 --repeats 1 --width 400 --height 300 --pre-size 217 --crop 128)
  BENCH=(--width tiny --crop 64x64 --eval-size 32x48 --precision fp16 --rounds 1 --warmup 0 --sections train
         --out "$WORK/bench.json")
else
  DEVICE=cuda
  DATA_CS=(--images 4 --repeats 2 --crop 1024,2048)
  DATA_MVD=(--images 4 --repeats 2 --width 4000 --height 3000 --pre-size 2177 --crop 1024)
  BENCH=(--device cuda --full --precision fp16 --rounds 3 --sections train recipe --out "$WORK/bench.json")
fi

stage preflight 60 "$PY" - "$DEVICE" <<'EOF'
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

stage --soft tests 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/utils/test_gpu_checks.py \
  tests/utils/test_precision_steps.py -rs --junitxml="$WORK/tests.xml"
if [[ $DRY -eq 0 ]] && grep -q '<skipped' "$WORK/tests.xml" 2>/dev/null; then
  soft_failure "stage 'tests': GPU tests were skipped on a machine with CUDA (reasons above)"
fi

stage bench 200 "$PY" -m scripts.bench "${BENCH[@]}"
stage data_cityscapes 60 env OMP_NUM_THREADS=1 "$PY" -m scripts.bench_data "${DATA_CS[@]}" --no-gblur \
  --resample pil --no-centroids --json "$WORK/data_cityscapes.json"
stage data_mapillary 90 env OMP_NUM_THREADS=1 "$PY" -m scripts.bench_data --dataset mapillary "${DATA_MVD[@]}" \
  --resample pil --no-centroids --json "$WORK/data_mapillary.json"

"$PY" - "$WORK" "$OUT" "$DRY" ${FAILED[@]+"${FAILED[@]}"} <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET
work, out, dry, failed = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4:]
tests = None  # pytest wrote no report (it did not start, or was killed)
if os.path.exists(f"{work}/tests.xml"):
    suite = ET.parse(f"{work}/tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    tests = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
with open(f"{work}/bench.json") as f:
    bench = json.load(f)
stages = dict(line.split() for line in open(f"{work}/stages.txt"))
train = {r["model"]: r for r in bench.get("train", [])}
sys.path.insert(0, ".")
from utils.config import load_config
# The HRNet-OCR step measured at 1024x1024 x 2 (the Mapillary recipe); the Cityscapes recipe's 1024x2048 x 1 crop
# has as many pixels, so its step is taken to consume half the images per second.
step = train["hmsa_ocrnet_hrnet_w48"]
data = {}
for name, config, per_step in (("cityscapes", "configs/cityscapes/hmsa_ocrnet_hrnet_w48_1024x2048.yaml", 0.5),
                               ("mapillary", "configs/mapillary/hmsa_ocrnet_hrnet_w48_1024x1024.yaml", 1.0)):
    with open(f"{work}/data_{name}.json") as f:
        measured = json.load(f)
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
result = {"dry_run": dry, "device": bench["machine"]["device"], "stage_seconds": {k: int(v) for k, v in stages.items()},
          "failed": failed, "tests": tests, "bench": bench, "data": data}
with open(out, "w") as f:
    json.dump(result, f, indent=1)
for name, r in train.items():
    print(f"{name}: {r['images_per_s']:.2f} img/s, MFU {r['mfu'] if r['mfu'] is None else format(r['mfu'], '.1%')} "
          f"at {r['crop'][0]}x{r['crop'][1]} x {r['batch']}")
for r in bench.get("recipe", {}).get("memory", []):
    if r["how"].startswith("measured"):
        print(f"{r['case']} {r['precision']}: peak {r['peak_gib']:.2f} GiB (measured)")
print(f"gpu_check: {'measured, with failures (below)' if failed else 'OK'}, wrote {out}")
EOF
if [[ ${#FAILED[@]} -gt 0 ]]; then
  fail "$(printf '%s; ' "${FAILED[@]}")the measurements are in $OUT"
fi
