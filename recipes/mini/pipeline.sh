#!/usr/bin/env bash
# fun-audio-chat-mini end to end, resumable across sessions: every step skips what is already done and every
# training stage resumes from its last checkpoint. Run it in the background and come back:
#
#   OMP_NUM_THREADS=2 nohup bash recipes/mini/pipeline.sh >> runs/mini-pipeline.log 2>&1 &
#
# The steps are those of recipes/mini/pre_align.yaml's header. THREADS (default 2) sets the CPU threads of the data
# steps, WORKERS (default 2) the processes of the audio stage, and OMP_NUM_THREADS those of training: use THREADS=1
# and OMP_NUM_THREADS=1 while anything else runs (two torch threads on two shared cores wait on each other: 5x
# slower, docs/mini.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
fac=".venv/bin/funaudiochat"
threads="${THREADS:-2}"
step() { echo "== $(date -u +%FT%TZ) $*"; }

if ! grep -q '"trained"' checkpoints/mini-base/config.json 2>/dev/null; then
  step "assets smollm2 (the starting checkpoint)"
  "$fac" assets smollm2 checkpoints/mini-base
fi
if [ ! -f recipes/mini/data/text.jsonl.gz ]; then
  step "data: text stage (the base model answers every question; resumable)"
  "$fac" data build-mini --out data/mini --resume --stage text --threads "$threads" --batch-size 32 --no-progress
fi
step "data: audio stage (resumable; quick when done)"
"$fac" data build-mini --out data/mini --resume --stage audio --threads "$threads" --workers "${WORKERS:-2}" --no-progress
# the speech stage (one process; only the speaking stages need it) runs beside the hearing stages' training
step "data: speech stage, in the background (kept as is when its records are unchanged)"
"$fac" data build-mini --out data/mini --resume --stage speech --no-progress &
speech=$!

train() {  # train RECIPE RUN_DIR: resume until RUN_DIR/final exists
  [ -d "$2/final" ] || { step "train $1"; "$fac" train "$1" --resume; }
}
train recipes/mini/pre_align.yaml runs/mini/pre_align
train recipes/mini/core_cocktail_stage1.yaml runs/mini/core_cocktail_stage1
if [ ! -d runs/mini/core_cocktail_merged ]; then
  step "merge stage 1 with the pre-aligned model at alpha 0.5"
  "$fac" merge runs/mini/pre_align/final runs/mini/core_cocktail_stage1/final runs/mini/core_cocktail_merged --alpha 0.5
fi
train recipes/mini/core_cocktail_stage2.yaml runs/mini/core_cocktail_stage2
train recipes/mini/single_stage_baseline.yaml runs/mini/single_stage_baseline
# speaking (issue 14): the S2S stage on the hearing model, and the same at k = 1 for the DRSR comparison
wait "$speech"
train recipes/mini/speak.yaml runs/mini/speak
train recipes/mini/speak_k1.yaml runs/mini/speak_k1

step "ship: deltas (hearing + speaking), assembly, evaluation"
"$fac" assets mini-deltas runs/mini/speak/final models/mini --base checkpoints/mini-base
"$fac" assets mini checkpoints/mini
"$fac" eval mini --model checkpoints/mini --data data/mini --split test --baseline runs/mini/single_stage_baseline/final \
  --latency 50 --compile --out runs/mini/eval --threads "$threads"
step "done"
