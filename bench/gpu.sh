#!/usr/bin/env bash
# One-shot GPU benchmark (issue 17): BERT-base MLM (configs/mlm/base.yaml) on 1 GPU in bf16 at seq 128 and
# 512, a few hundred steps each (sdpa; + torch.compile when the config has a `compile` key; + flash
# attention with document masks when flash_attn is installed), then one table: tokens/s, MFU, peak memory.
# Meant to finish in under 8 minutes on one H100 (the venv build excepted when torch must be downloaded).
#
#   bash bench/gpu.sh                 # builds .venv-gpu with a CUDA torch unless the current python has one
#   TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash bench/gpu.sh
#   PYTHON=/path/to/python bash bench/gpu.sh      # use an existing environment as it is
#   bash bench/gpu.sh --dry-run       # on a CPU: tiny model, 3 steps per run, same plan/parse/table code
#   SHARDS=DIR bash bench/gpu.sh      # reuse token shards made before (llm-dist prepare … --out DIR)
#
# Output: OUT (default bench/gpu_out/<date>) holds the shards, each run dir, table.txt and table.json.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1' (--dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
OUT="${OUT:-bench/gpu_out/$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT/runs"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline WANDB_SILENT=true
START=$(date +%s)
PLAN_ARGS=()
PREP_ARGS=()
RUN_TIMEOUT=150

if [ "$DRY" = 1 ]; then
  PY="${PYTHON:-$(command -v python3)}"
  export CUDA_VISIBLE_DEVICES="" ACCELERATE_USE_CPU=1
  PLAN_ARGS=(--dry-run)
  PREP_ARGS=(--tokenizer.vocab_size=4096)
  RUN_TIMEOUT=300
  echo "dry run: CPU, tiny preset, $PY"
else
  command -v nvidia-smi >/dev/null || { echo "error: no nvidia-smi: this needs a CUDA machine (or --dry-run)" >&2; exit 2; }
  has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
  if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
  elif has_cuda "$(command -v python3)" && python3 -c 'import llm_dist' 2>/dev/null; then
    PY="$(command -v python3)"
  else
    # PyPI's torch wheel for Linux x86_64 is a CUDA build; TORCH may name another (e.g. --index-url …/cu128)
    VENV="${VENV:-.venv-gpu}"
    test -x "$VENV/bin/python" || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q ${TORCH:-torch==2.13.0}
    "$VENV/bin/python" -m pip install -q -e .
    PY="$VENV/bin/python"
  fi
  has_cuda "$PY" || { echo "error: $PY: torch has no CUDA ($("$PY" -c 'import torch; print(torch.__version__)')); set TORCH to a CUDA build" >&2; exit 2; }
  "$PY" -c 'import torch; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name()}")'
fi

# the corpus tokenized once (the BERT-base WordPiece is trained here, once, not in every run); SHARDS=DIR
# uses shards prepared before (`llm-dist prepare`) instead
if [ -z "${SHARDS:-}" ]; then
  SHARDS="$OUT/shards"
  "$PY" -m llm_dist.cli prepare configs/mlm/base.yaml --out "$SHARDS" "${PREP_ARGS[@]}" 2>&1 | grep -v '^prepare shards' || true
fi
test -f "$SHARDS/manifest.json" || { echo "error: no token shards ($SHARDS/manifest.json)" >&2; exit 2; }

"$PY" bench/gpu_bench.py plan "${PLAN_ARGS[@]}" > "$OUT/plan.tsv"
grep '^#' "$OUT/plan.tsv" || true
DONE=()
while IFS=$'\t' read -r NAME OVERRIDES; do
  case "$NAME" in '#'*|'') continue ;; esac
  echo "run $NAME ($(( $(date +%s) - START )) s so far)"
  # shellcheck disable=SC2086
  if timeout "$RUN_TIMEOUT" "$PY" train.py configs/mlm/base.yaml --output_dir="$OUT/runs/$NAME" \
       --data.shards="$SHARDS" $OVERRIDES > "$OUT/runs/$NAME.log" 2>&1; then
    DONE+=("$OUT/runs/$NAME")
  else
    echo "  $NAME failed or timed out (exit $?): see $OUT/runs/$NAME.log"; tail -n 3 "$OUT/runs/$NAME.log" | sed 's/^/    /'
  fi
done < "$OUT/plan.tsv"
[ ${#DONE[@]} -gt 0 ] || { echo "error: no run finished" >&2; exit 1; }
"$PY" bench/gpu_bench.py table "${DONE[@]}" --out "$OUT/table.json" | tee "$OUT/table.txt"
echo "total $(( $(date +%s) - START )) s; results in $OUT"
