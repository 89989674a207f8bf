# Shared by the sbatch scripts (sourced, not run): launch one task per GPU with srun, forward the preemption
# warning to the tasks, and requeue the job when the tasks stopped because of it.

PYTHON=${PYTHON:-python}
# Data-loader workers are the parallelism inside a task; keep math libraries to the task's CPUs.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

log() { echo "[$(date '+%F %T')] job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}): $*"; }

warned=0
task_pid=""
forward() {  # $1: signal name
    [ "$1" = USR1 ] && warned=1
    log "received SIG$1, forwarding it to the tasks"
    [ -n "$task_pid" ] && kill -s "$1" "$task_pid" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# run_tasks SCRIPT ARGS...: srun one task per GPU of the allocation; exits with the tasks' status, or requeues.
run_tasks() {
    log "nodes ${SLURM_JOB_NODELIST:-?}, ${SLURM_NTASKS:-1} task(s): $PYTHON $*"
    # --kill-on-bad-exit: a task that fails takes the others down at once instead of leaving them waiting in a
    # collective; --label prefixes each output line with the task's rank (warnings of every rank stay visible).
    srun --kill-on-bad-exit=1 --label --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" "$PYTHON" "$@" &
    task_pid=$!
    local rc
    while :; do  # `wait` returns early when a trapped signal arrives: wait again until srun has ended
        wait "$task_pid"
        rc=$?
        kill -0 "$task_pid" 2>/dev/null || break
    done
    if [ "$warned" = 1 ] && [ "$rc" -ne 0 ]; then
        log "tasks stopped on the preemption warning (exit $rc): requeueing"
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        log "scontrol requeue failed; resubmit this script with the same arguments to resume"
    fi
    log "tasks finished with exit code $rc"
    exit "$rc"
}
