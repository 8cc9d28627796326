# shellcheck shell=bash
# Shared by slurm/*.sbatch (sourced in the batch shell, on the job's first node).
#
#   llm_dist_setup            cd to the repo, activate the env, CPU/GPU mode, process counts,
#                             main node address + free port, requeue banner
#   llm_dist_launch_args      fills the array LAUNCH_ARGS with the `accelerate launch` flags
#                             (all but --machine_rank, which each node adds for itself)
#   llm_dist_run CMD...       runs CMD (an `srun ...` line) in the background and makes it
#                             preemption safe: USR1 -> forwarded to the trainer -> checkpoint ->
#                             `scontrol requeue $SLURM_JOB_ID`; TERM -> wait for the trainer's
#                             checkpoint, no requeue.
#
# Everything is configured by the variables at the top of each .sbatch script; their defaults
# live here so that the scripts stay short.

llm_dist_log() { echo "[llm_dist $(date +%H:%M:%S)] $*"; }

llm_dist_die() { echo "[llm_dist] error: $*" >&2; exit 1; }

# --------------------------------------------------------------------------------------- setup
llm_dist_setup() {
    [[ -n ${SLURM_JOB_ID:-} ]] || llm_dist_die "not inside a SLURM job (submit with sbatch)"
    REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
    cd "$REPO_DIR" || llm_dist_die "REPO_DIR=$REPO_DIR does not exist"
    [[ -f train.py ]] || llm_dist_die "no train.py in REPO_DIR=$REPO_DIR (submit from the repo root or set REPO_DIR)"

    # Environment activation: runs once in the batch shell; srun passes the environment on to
    # every node (srun --export=ALL is the default).
    if [[ -n ${ENV_SETUP:-} ]]; then
        eval "$ENV_SETUP" || llm_dist_die "ENV_SETUP failed: $ENV_SETUP"
    fi
    command -v accelerate >/dev/null || llm_dist_die "accelerate not found on PATH (check ENV_SETUP)"

    NNODES=${SLURM_NNODES:-1}
    if [[ ${LLM_DIST_CPU:-0} == 1 ]]; then
        # CPU mode (tests, laptops): gloo over the network, one process per node unless told.
        # Not with DeepSpeed: accelerate silently drops DeepSpeed when ACCELERATE_USE_CPU=1, and
        # DeepSpeed finds the CPU (and gloo) by itself on a machine without GPUs.
        [[ -z ${DS_CONFIG:-} ]] && export ACCELERATE_USE_CPU=1
        NPROC_PER_NODE=${NPROC_PER_NODE:-1}
    else
        if [[ -z ${NPROC_PER_NODE:-} ]]; then
            # one process per allocated GPU: SLURM_GPUS_ON_NODE (set with --gpus-per-node/--gres),
            # else --gpus-per-node's value (may be "type:count"), else what nvidia-smi sees.
            local g=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
            g=${g##*:}
            if [[ -z $g ]] && command -v nvidia-smi >/dev/null; then g=$(nvidia-smi -L 2>/dev/null | wc -l); fi
            NPROC_PER_NODE=${g:-1}
        fi
    fi
    [[ $NPROC_PER_NODE =~ ^[0-9]+$ && $NPROC_PER_NODE -ge 1 ]] || llm_dist_die "bad NPROC_PER_NODE=$NPROC_PER_NODE"
    # the launcher flag: what a run config with `mixed_precision: auto` (the default) uses; a run
    # config value (configs/mlm/base.yaml: bf16) wins over it
    MIXED_PRECISION=${MIXED_PRECISION:-no}
    # CPU threads per process: the task's cores shared by the node's processes
    local cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / NPROC_PER_NODE > 0 ? cpus / NPROC_PER_NODE : 1 ))}
    NUM_PROCESSES=$(( NNODES * NPROC_PER_NODE ))   # accelerate wants the TOTAL process count

    # Rendezvous: the first node of the allocation (= SLURM_NODEID 0 = machine_rank 0, where this
    # batch shell runs). Its address is what SLURM itself uses to reach it (NodeAddr), which is the
    # hostname on almost every cluster.
    MAIN_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    if [[ -z ${MAIN_PROCESS_IP:-} ]]; then
        MAIN_PROCESS_IP=$(scontrol show node "$MAIN_NODE" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n1)
        MAIN_PROCESS_IP=${MAIN_PROCESS_IP:-$MAIN_NODE}
    fi
    MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-$(llm_dist_free_port)}

    # Job-stable output dir: the same across requeues (same SLURM_JOB_ID), so the requeued job
    # finds its checkpoints and resumes (the trainer's resume=auto).
    if [[ -z ${OUTPUT_DIR:-} ]]; then
        if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then
            OUTPUT_DIR=runs/slurm/${SLURM_JOB_NAME:-job}-${SLURM_ARRAY_JOB_ID}/task${SLURM_ARRAY_TASK_ID}
        else
            OUTPUT_DIR=runs/slurm/${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID}
        fi
    fi
    mkdir -p "$OUTPUT_DIR"

    LLM_DIST_RESTART=${SLURM_RESTART_COUNT:-0}
    llm_dist_log "job $SLURM_JOB_ID on $NNODES node(s) [$SLURM_JOB_NODELIST], $NPROC_PER_NODE process(es)/node," \
        "$NUM_PROCESSES in all, mode=$([[ ${LLM_DIST_CPU:-0} == 1 ]] && echo cpu || echo gpu)," \
        "main=$MAIN_PROCESS_IP:$MAIN_PROCESS_PORT, output_dir=$OUTPUT_DIR"
    if (( LLM_DIST_RESTART > 0 )); then
        if [[ -s $OUTPUT_DIR/checkpoints/latest ]]; then
            llm_dist_log "requeued job (SLURM_RESTART_COUNT=$LLM_DIST_RESTART): resuming from" \
                "$OUTPUT_DIR/checkpoints/$(cat "$OUTPUT_DIR/checkpoints/latest")"
        else
            llm_dist_log "requeued job (SLURM_RESTART_COUNT=$LLM_DIST_RESTART) but no checkpoint in $OUTPUT_DIR: starting over"
        fi
    fi
}

# A TCP port that is free on this (the main) node right now.
llm_dist_free_port() {
    python - <<'EOF' 2>/dev/null || echo $(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))
import socket
s = socket.socket()
s.bind(("", 0))
print(s.getsockname()[1])
EOF
}

# The `accelerate launch` flags shared by all nodes. --machine_rank is NOT here: it must be
# $SLURM_NODEID as seen on each node, so the srun line adds it inside single quotes.
llm_dist_launch_args() {
    LAUNCH_ARGS=(--num_machines "$NNODES" --num_processes "$NUM_PROCESSES"
                 --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT"
                 --mixed_precision "$MIXED_PRECISION" --dynamo_backend no)
    if (( NUM_PROCESSES > 1 )); then
        # torchrun-based launcher on every node (also for DeepSpeed: the trainer builds its
        # DeepSpeedPlugin from --deepspeed.config, so accelerate's pdsh launcher is never used).
        LAUNCH_ARGS=(--multi_gpu "${LAUNCH_ARGS[@]}" --rdzv_backend static)
    fi
    llm_dist_launcher_ignores
}

# The srun'd command on each node (written out in each .sbatch):
#   bash -c 'trap "" ${LLM_DIST_LAUNCHER_IGNORES:-USR1}; exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"'
# The launcher runs with USR1 *ignored*: torchrun has no USR1 handler, so USR1 (which slurmstepd
# delivers to every process of the step) would kill it, and slurmstepd would then SIGKILL the
# orphaned workers before they checkpoint. The trainer installs its own USR1/TERM handler, which
# replaces the inherited "ignore", so the workers still act on the signal. With a single process
# accelerate uses its simple launcher, which has no TERM handler either: it ignores TERM too
# (torchrun does handle TERM: it forwards it and waits for the workers).
llm_dist_launcher_ignores() {
    if (( NUM_PROCESSES > 1 )); then LLM_DIST_LAUNCHER_IGNORES=USR1; else LLM_DIST_LAUNCHER_IGNORES="USR1 TERM"; fi
    export LLM_DIST_LAUNCHER_IGNORES
}

# ------------------------------------------------------------------------ preemption + requeue
LLM_DIST_SIGNAL=""
LLM_DIST_TERM=""
LLM_DIST_STEP_PID=""

_llm_dist_forward_usr1() { # srun relays USR1 to every task, i.e. to every process of the step
    [[ -n $LLM_DIST_STEP_PID ]] && kill -s USR1 "$LLM_DIST_STEP_PID" 2>/dev/null
    return 0
}

_llm_dist_on_usr1() {
    if [[ -z $LLM_DIST_SIGNAL ]]; then
        llm_dist_log "got SIGUSR1 (preemption / time limit near): asking the trainer to checkpoint"
        LLM_DIST_SIGNAL=USR1
        LLM_DIST_SIGNAL_TIME=$SECONDS
    fi
    _llm_dist_forward_usr1
}

# TERM (scancel, the time limit itself, preemption with GraceTime) is NOT forwarded: SLURM sends
# it to every process of every step itself (the trainer checkpoints on it; torchrun forwards it
# and waits), and srun turns a TERM it is sent by hand into a SIGKILL of all tasks. The batch
# shell only keeps waiting, so the checkpoint can finish within KillWait / GraceTime.
_llm_dist_on_term() {
    llm_dist_log "got SIGTERM (scancel / time limit / preemption): the trainer checkpoints; not requeueing"
    [[ -z $LLM_DIST_SIGNAL ]] && LLM_DIST_TERM=1
}

# Did the trainer stop on a signal during this run (run.json written after $1 says so)?
_llm_dist_stopped_on_signal() {
    local stamp=$1 rj=$OUTPUT_DIR/run.json
    [[ -f $rj && $rj -nt $stamp ]] || return 1
    grep -Eq '"signalled": *true' "$rj"
}

llm_dist_run() {
    local stamp rc
    stamp=$(mktemp "${TMPDIR:-/tmp}/llm_dist_run.XXXXXX")
    trap _llm_dist_on_usr1 USR1
    trap _llm_dist_on_term TERM
    llm_dist_log "launch: $*"
    "$@" &
    LLM_DIST_STEP_PID=$!
    local resend=${LLM_DIST_RESIGNAL_SECS:-20} last=0
    while kill -0 "$LLM_DIST_STEP_PID" 2>/dev/null; do
        if [[ $LLM_DIST_SIGNAL != USR1 ]]; then
            wait "$LLM_DIST_STEP_PID"   # returns early (>128) when a trapped signal arrives
        else
            # After USR1: poll, and repeat it now and then (harmless: the trainer only sets a
            # flag) in case it arrived before the trainer had installed its handler.
            sleep 1 &
            wait $! 2>/dev/null
            if (( SECONDS - LLM_DIST_SIGNAL_TIME >= resend * (last + 1) )); then
                last=$(( last + 1 ))
                _llm_dist_forward_usr1
            fi
        fi
    done
    wait "$LLM_DIST_STEP_PID"; rc=$?
    trap - USR1 TERM
    LLM_DIST_STEP_PID=""
    llm_dist_log "training step exited with code $rc"

    if [[ $LLM_DIST_SIGNAL == USR1 ]]; then
        if _llm_dist_stopped_on_signal "$stamp"; then
            rm -f "$stamp"
            local max=${MAX_REQUEUES:-50}
            if (( LLM_DIST_RESTART >= max )); then
                llm_dist_log "checkpoint saved, but already requeued $LLM_DIST_RESTART times (MAX_REQUEUES=$max): not requeueing"
                exit 1
            fi
            llm_dist_log "checkpoint saved on signal ($OUTPUT_DIR/checkpoints/$(cat "$OUTPUT_DIR/checkpoints/latest" 2>/dev/null));" \
                "requeueing job $SLURM_JOB_ID"
            # The job is put back in the queue and this shell is ended by SLURM. The requeued run
            # (SLURM_RESTART_COUNT > 0) has the same job id, hence the same OUTPUT_DIR, and resumes.
            if scontrol requeue "$SLURM_JOB_ID"; then
                sleep 60   # SLURM ends this shell now; exiting first could race the requeue
                exit 0
            fi
            llm_dist_log "scontrol requeue failed (was the job submitted with --requeue? JobRequeue=0?):" \
                "resubmit this script; it resumes from the checkpoint in $OUTPUT_DIR"
            exit 1
        fi
        llm_dist_log "got USR1 but the trainer did not stop on it (finished first, or failed): not requeueing"
    elif [[ -n $LLM_DIST_TERM ]] && _llm_dist_stopped_on_signal "$stamp"; then
        llm_dist_log "checkpoint saved on SIGTERM; submit the same script with OUTPUT_DIR=$OUTPUT_DIR to resume"
    fi
    rm -f "$stamp"
    return "$rc"
}
