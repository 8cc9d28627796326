#!/bin/bash
# Sharded data audit on SLURM: a job array scans the shards, then one dependent job merges them.
#
#   slurm/audit_array.sh --data train=corpus/ --data test=test.jsonl --id_column id
#   slurm/audit_array.sh configs/classify/demo.yaml
#   SHARDS=32 MERGE_ARGS="--dedup --decontaminate" OUT_DIR=runs/audit slurm/audit_array.sh --data train='shards/*.parquet' ...
#
# Run it from the repository root (not with sbatch): it submits
#   1. an array of $SHARDS tasks, task i running   llm-dist audit ARGS --shard i/$SHARDS --output_dir $PARTS_DIR
#      (a train split of >= $SHARDS files is split by file, each task reading only its files; a single file by row)
#   2. a merge job (--dependency=afterok on the whole array) running
#      llm-dist audit merge $PARTS_DIR --output_dir $OUT_DIR $MERGE_ARGS
# and prints both job ids. The same two commands run anywhere else (a loop, GNU parallel, other schedulers).
# A task that fails can be rerun alone (sbatch --array=<i> ...): shards are written atomically, and the merge
# refuses to start while a shard is missing. See docs/audit.md.
#
# Settings (environment):
SHARDS=${SHARDS:-8}                          # array size
PARTS_DIR=${PARTS_DIR:-runs/audit-parts}     # partials (one dir per shard, ~num_perm*4 bytes per document)
OUT_DIR=${OUT_DIR:-runs/audit}               # audit.json / audit.md / audit.html (+ clean/)
MERGE_ARGS=${MERGE_ARGS:-}                   # e.g. "--dedup --decontaminate --scrub-pii"
CPUS=${CPUS:-8}                              # cores per task: the scan uses them all (--num_proc)
PARTITION=${PARTITION:-}                     # e.g. cpu (sinfo -s); empty: the cluster default
TIME=${TIME:-02:00:00}
MERGE_MEM=${MERGE_MEM:-}                     # e.g. 32G: the merge holds every document's MinHash signature
#                                            #   (~0.6 KB/document with the LSH index); empty: the default
ENV_SETUP=${ENV_SETUP:-'if [[ -f .venv/bin/activate ]]; then source .venv/bin/activate; fi'}
LOG_DIR=${LOG_DIR:-slurm/logs}
# ---------------------------------------------------------------------------------------------
set -euo pipefail

audit() { # run the audit CLI from the repository (works without an installed console script)
    eval "$ENV_SETUP"
    exec python -m llm_dist.analysis.audit "$@"
}

case ${AUDIT_STAGE:-submit} in
shard)
    i=${SLURM_ARRAY_TASK_ID:?the shard stage runs as an array task}
    echo "[audit] shard $i/$SHARDS on $(hostname): $*"
    audit "$@" --shard "$i/$SHARDS" --output_dir "$PARTS_DIR" --num_proc "${SLURM_CPUS_PER_TASK:-$CPUS}" --quiet
    ;;
merge)
    echo "[audit] merge $PARTS_DIR -> $OUT_DIR on $(hostname)"
    # shellcheck disable=SC2086
    audit merge "$PARTS_DIR" --output_dir "$OUT_DIR" $MERGE_ARGS --quiet
    ;;
submit)
    [[ $# -gt 0 ]] || { echo "usage: slurm/audit_array.sh CONFIG.yaml | --data train=PATH [--data test=PATH] [...]" >&2; exit 2; }
    [[ -f llm_dist/analysis/audit/__main__.py ]] || { echo "run from the repository root" >&2; exit 2; }
    command -v sbatch >/dev/null || { echo "sbatch not found: not on a SLURM login node" >&2; exit 2; }
    mkdir -p "$LOG_DIR" "$PARTS_DIR"
    common=(--chdir "$PWD" --time "$TIME")
    [[ -n $PARTITION ]] && common+=(--partition "$PARTITION")
    array=$(sbatch --parsable "${common[@]}" --job-name audit-shard --array "0-$((SHARDS - 1))" \
        --cpus-per-task "$CPUS" --output "$LOG_DIR/%x-%A_%a.out" \
        --export "ALL,AUDIT_STAGE=shard,SHARDS=$SHARDS,PARTS_DIR=$PARTS_DIR,OUT_DIR=$OUT_DIR" "$0" "$@")
    array=${array%%;*}
    mem=()
    [[ -n $MERGE_MEM ]] && mem=(--mem "$MERGE_MEM")
    if ! merge=$(sbatch --parsable "${common[@]}" "${mem[@]}" --job-name audit-merge --dependency "afterok:$array" \
        --cpus-per-task 1 --output "$LOG_DIR/%x-%j.out" \
        --export "ALL,AUDIT_STAGE=merge,SHARDS=$SHARDS,PARTS_DIR=$PARTS_DIR,OUT_DIR=$OUT_DIR,MERGE_ARGS=$MERGE_ARGS" "$0"); then
        echo "merge job not accepted: cancelling the shard array $array" >&2
        scancel "$array" || true
        exit 1
    fi
    merge=${merge%%;*}
    echo "submitted: shards = job array $array (0-$((SHARDS - 1))), merge = job $merge (after all shards succeed)"
    echo "results:   $OUT_DIR/audit.md (logs in $LOG_DIR)"
    ;;
*)
    echo "AUDIT_STAGE=$AUDIT_STAGE: expected submit, shard or merge" >&2; exit 2 ;;
esac
