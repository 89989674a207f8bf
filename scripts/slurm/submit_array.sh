#!/bin/bash
# Submit scripts/slurm/array.sbatch with one array task per line of LIST:
#   scripts/slurm/submit_array.sh train|eval LIST [sbatch options --] [array.sbatch arguments...]
# e.g. scripts/slurm/submit_array.sh eval scales.txt --config configs/cityscapes/eval_hmsa_ocrnet_hrnet_w48.yaml
#      scripts/slurm/submit_array.sh train ablations.txt --nodes=2 -- --config configs/cityscapes/RECIPE.yaml
# Options before a `--` go to sbatch; without `--`, everything after LIST goes to array.sbatch.
set -euo pipefail
mode=${1:?usage: submit_array.sh train|eval LIST [sbatch options --] [arguments...]}
list=${2:?usage: submit_array.sh train|eval LIST [sbatch options --] [arguments...]}
shift 2
n=$(grep -c -v -e '^[[:space:]]*$' -e '^[[:space:]]*#' "$list" || true)
[ "$n" -gt 0 ] || { echo "$list holds no lines" >&2; exit 2; }
sbatch_opts=()
if [[ " $* " == *" -- "* ]]; then
    while [ "$1" != "--" ]; do sbatch_opts+=("$1"); shift; done
    shift
fi
here=$(cd "$(dirname "$0")" && pwd)
exec sbatch --array="0-$((n - 1))" "${sbatch_opts[@]}" "$here/array.sbatch" "$mode" "$list" "$@"
