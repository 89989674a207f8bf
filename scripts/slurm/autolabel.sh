#!/bin/bash
# The auto-labelling pipeline (scripts/experiments/autolabel.py) as a chain of jobs, one per stage:
#   scripts/slurm/autolabel.sh [sbatch options --] --out DIR [--config RECIPE] [--teacher CKPT] [key=value ...]
# e.g. scripts/slurm/autolabel.sh --nodes=2 -- --out runs/sota --config configs/cityscapes/RECIPE.yaml data.root=CS
# teacher first; fine_only and autolabel once it has succeeded (afterok), student after autolabel, report after
# student and fine_only. A stage that fails stops the chain: its job says so, and SLURM cancels the jobs that
# depend on it (--kill-on-invalid-dep=yes). Finished stages are skipped when the chain is submitted again.
# Options before a `--` go to every sbatch; the job ids are printed and written to DIR/chain.txt.
set -euo pipefail
sbatch_opts=()
if [[ " $* " == *" -- "* ]]; then
    while [ "$1" != "--" ]; do sbatch_opts+=("$1"); shift; done
    shift
fi
out=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
    --out) out=${args[$((i + 1))]:-} ;;
    --out=*) out=${args[$i]#--out=} ;;
    esac
done
if [ -z "$out" ]; then
    echo "usage: autolabel.sh [sbatch options --] --out DIR [arguments...]: --out is missing" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)

submit() {  # submit STAGE DEPENDENCIES(colon-separated job ids, or ''): prints the job id
    local stage=$1 after=$2
    local dep=()
    [ -n "$after" ] && dep=("--dependency=afterok:$after" "--kill-on-invalid-dep=yes")
    sbatch --parsable --job-name="hmsa-autolabel-$stage" "${dep[@]}" "${sbatch_opts[@]}" \
        "$here/autolabel.sbatch" "$stage" "${args[@]}" | cut -d';' -f1
}
teacher=$(submit teacher "")
fine=$(submit fine_only "$teacher")
auto=$(submit autolabel "$teacher")
student=$(submit student "$auto")
report=$(submit report "$student:$fine")
mkdir -p "$out"
printf 'teacher %s\nfine_only %s\nautolabel %s\nstudent %s\nreport %s\n' "$teacher" "$fine" "$auto" "$student" \
    "$report" | tee "$out/chain.txt"
