# Shared by the sbatch scripts (sourced, not run): launch one task per GPU with srun, forward the preemption
# warning to the tasks, wait for them to checkpoint on any stop, and requeue the job when SLURM will not.

PYTHON=${PYTHON:-python}
# Data-loader workers are the parallelism inside a task; keep math libraries to the task's CPUs.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

log() { echo "[$(date '+%F %T')] job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}): $*"; }

warned=0      # USR1: the warning before the time limit (--signal), forwarded to the tasks
terminated=0  # TERM: SLURM is ending the job (scancel, scontrol requeue, time limit, end of a preemption's grace)
task_pid=""
to_tasks() {  # $1: signal name; srun forwards it to every process of the step
    [ -n "$task_pid" ] && kill -s "$1" "$task_pid" 2>/dev/null
}
on_usr1() {
    warned=1
    log "received SIGUSR1, forwarding it to the tasks"
    to_tasks USR1
}
# SLURM sends SIGTERM to every process of every step: the tasks have their own and checkpoint within KillWait.
# Never forward TERM to srun: srun answers it with SIGKILL of the tasks while the job still runs. USR1 stops the
# tasks the same way, and reaches them also when this script alone was signalled (scancel --batch --signal=TERM).
on_term() {
    terminated=1
    log "received SIGTERM: the tasks checkpoint and stop (USR1 forwarded)"
    to_tasks USR1
}
trap on_usr1 USR1
trap on_term TERM

# preempted: whether SLURM is preempting this job (it then sends SIGTERM to the steps only, not to this script,
# and GraceTime later requeues or cancels the job; a job that ends before that is neither).
preempted() {
    local time
    time=$(scontrol -o show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'PreemptTime=[^ ]*')
    [ -n "$time" ] && [ "$time" != "PreemptTime=None" ]
}

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
    if [ "$terminated" = 1 ]; then
        # scontrol requeue, the end of a preemption's grace time: SLURM requeues the job itself. scancel, the time
        # limit: it stays ended; the same sbatch command resumes from the checkpoint.
        log "tasks stopped on SIGTERM (exit $rc); SLURM requeues the job or ends it"
        exit "$rc"
    fi
    # After a SIGTERM of the steps srun reports 0 for tasks that exited on their own (75), so a preemption is read
    # from SLURM, not from the exit code.
    if { [ "$warned" = 1 ] && [ "$rc" -ne 0 ]; } || preempted; then
        log "tasks stopped on the preemption warning or a preemption (exit $rc): requeueing"
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        log "scontrol requeue failed; resubmit this script with the same arguments to resume"
    fi
    log "tasks finished with exit code $rc"
    exit "$rc"
}
