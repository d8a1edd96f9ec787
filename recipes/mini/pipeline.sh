#!/usr/bin/env bash
# fun-audio-chat-mini end to end, resumable across sessions: every step skips what is already done and every
# training stage resumes from its last checkpoint. Run it in the background and come back:
#
#   OMP_NUM_THREADS=2 nohup bash recipes/mini/pipeline.sh >> runs/mini-pipeline.log 2>&1 &
#
# The main line (the release): mini-reader -> hear_reader -> Core-Cocktail stage 1 -> merge -> stage 2 -> the speech
# head alone (speak_srh) -> speak -> the answer's cue and prosody (speak_prosody) -> the word reader in noise
# (reader_noisy) -> the base's answers distilled (hear_distill_s2s) -> the cue and prosody re-fitted on that LLM
# (speak_prosody_r7), then the single-stage baseline, assembly and evaluation. K1=1 also trains the speaking stages
# at group size 1 for the DRSR comparison (issue 14 must-show 5). THREADS (default 2) sets the CPU threads of the
# data steps, WORKERS (default 2) the processes of the audio stage, and OMP_NUM_THREADS those of training: use
# THREADS=1 and OMP_NUM_THREADS=1 while anything else runs (two torch threads on two shared cores wait
# on each other: 5x slower, docs/mini.md). STOP_AFTER=STAGE (hear_reader, core_cocktail_merged, core_cocktail_stage2,
# speak, speak_prosody, reader_noisy) ends the run once that stage of the main line is done, e.g. to score it before
# going on.
set -euo pipefail
cd "$(dirname "$0")/../.."
fac=".venv/bin/funaudiochat"
threads="${THREADS:-2}"
step() { echo "== $(date -u +%FT%TZ) $*"; }
case "${STOP_AFTER:-}" in
  ""|hear_reader|core_cocktail_merged|core_cocktail_stage2|speak|speak_prosody|reader_noisy) ;;
  *) echo "STOP_AFTER=$STOP_AFTER: not a stage of the main line (hear_reader, core_cocktail_merged," \
          "core_cocktail_stage2, speak, speak_prosody, reader_noisy)" >&2; exit 2 ;;
esac

if ! grep -q '"trained"' checkpoints/mini-base/config.json 2>/dev/null; then
  step "assets smollm2 (the starting checkpoint)"
  "$fac" assets smollm2 checkpoints/mini-base
fi
if [ ! -f checkpoints/mini-reader/config.json ]; then
  step "assets smollm2 --word-reader (the main line's starting checkpoint: Whisper's decoder reads the words)"
  "$fac" assets smollm2 checkpoints/mini-reader --word-reader
fi
if [ ! -f recipes/mini/data/text.jsonl.gz ]; then
  step "data: text stage (the base model answers every question; resumable)"
  "$fac" data build-mini --out data/mini --resume --stage text --threads "$threads" --batch-size 32 --no-progress
fi
# the committed manifest's clips with its judge's verdicts (about a quarter of a judged build's time); drop --replay
# to judge every clip again
step "data: audio stage, replaying recipes/mini/data/audio.manifest.jsonl.gz (resumable; quick when done)"
"$fac" data build-mini --out data/mini --resume --stage audio --threads "$threads" --workers "${WORKERS:-2}" --no-progress \
  --replay recipes/mini/data/audio.manifest.jsonl.gz
step "data: speech stage, the spoken answers (kept as is when its records are unchanged)"
"$fac" data build-mini --out data/mini --resume --stage speech --no-progress

# Each finished stage of the main line writes its deltas to models/mini/deltas.safetensors with the stage's name
# (commit them: the next session may run on a fresh machine). A stage whose output is missing here is restored from
# those deltas, in the working tree or in the commit that shipped them, before it would be trained again.
out_of() { [ "$1" = core_cocktail_merged ] && echo runs/mini/core_cocktail_merged || echo "runs/mini/$1/final"; }
base_of() {  # the starting checkpoint of a stage's line
  case "$1" in pre_align|hear|hear2) echo checkpoints/mini-base ;; *) echo checkpoints/mini-reader ;; esac; }
stage_of() { .venv/bin/python -c 'import sys; from funaudiochat.assets.mini_deltas import stage_of
print(stage_of(sys.argv[1]) or "")' "$1"; }
restore() {  # restore STAGE: 0 when its output is here or was rebuilt from committed deltas
  [ -d "$(out_of "$1")" ] && return 0
  local tmp rev
  tmp=$(mktemp -d)
  for rev in worktree $(git log --format=%H -- models/mini/deltas.safetensors 2>/dev/null); do
    if [ "$rev" = worktree ]; then cp models/mini/deltas.safetensors "$tmp/" 2>/dev/null || continue
    else git show "$rev:models/mini/deltas.safetensors" > "$tmp/deltas.safetensors" 2>/dev/null || continue; fi
    if [ "$(stage_of "$tmp/deltas.safetensors")" = "$1" ]; then
      step "restore $1 from the deltas of $rev"
      # deltas this version no longer assembles (e.g. release 1's reader) are passed over: the stage is trained
      if "$fac" assets mini "$(out_of "$1")" --deltas "$tmp" --base "$(base_of "$1")"; then
        rm -rf "$tmp"
        return 0
      fi
      step "the deltas of $rev do not assemble with this version; trying older ones, else training $1"
    fi
  done
  rm -rf "$tmp"
  return 1
}
snapshot() {  # snapshot STAGE [--bf16]
  "$fac" assets mini-deltas "$(out_of "$1")" models/mini --base "$(base_of "$1")" --stage "$1" "${@:2}"; }
stop_after() { if [ "${STOP_AFTER:-}" = "$1" ]; then step "stop after $1 (STOP_AFTER)"; exit 0; fi; }
train() {  # train RECIPE STAGE: resume until its final exists
  [ -d "runs/mini/$2/final" ] || { step "train $1"; "$fac" train "$1" --resume; }
}

hearing() {  # the hearing line up to Core-Cocktail stage 2, each stage restored or trained
  # LoRA on the LLM learns to take Whisper's words in the user's slots (ASR + spoken QA records)
  restore hear_reader || { train recipes/mini/hear_reader.yaml hear_reader; snapshot hear_reader; }
  stop_after hear_reader
  if ! restore core_cocktail_merged; then
    train recipes/mini/core_cocktail_stage1.yaml core_cocktail_stage1
    step "merge stage 1 with the hearing model at alpha 0.5"
    "$fac" merge runs/mini/hear_reader/final runs/mini/core_cocktail_stage1/final runs/mini/core_cocktail_merged \
      --alpha 0.5
    snapshot core_cocktail_merged
  fi
  stop_after core_cocktail_merged
  train recipes/mini/core_cocktail_stage2.yaml core_cocktail_stage2
  snapshot core_cocktail_stage2
}
# A stage restored from committed deltas makes the stages before it unnecessary: only what is missing is trained
# (and only then are models/mini/deltas.safetensors rewritten with an earlier stage).
case "${STOP_AFTER:-}" in
  hear_reader|core_cocktail_merged) hearing ;;
  core_cocktail_stage2) restore core_cocktail_stage2 || hearing; stop_after core_cocktail_stage2 ;;
esac
# speaking: the head alone on the frozen hearing model, then the head with the speech opener (the LLM stays frozen),
# then the answer's cue and prosody on that head (only those two projections train; release 4 ships them in bf16);
# last, Whisper's encoder and its decoder's attention to it read the train clips through noise and the phone band
# (release 5, in bf16)
case "${STOP_AFTER:-}" in speak|speak_prosody) speaking=1 ;; *) speaking=0 ;; esac
if [ "$speaking" = 1 ] || ! restore reader_noisy; then
  if [ "${STOP_AFTER:-}" = speak ] || ! restore speak_prosody; then
    if ! restore speak; then
      restore core_cocktail_stage2 || hearing
      train recipes/mini/speak_srh.yaml speak_srh
      train recipes/mini/speak.yaml speak
      snapshot speak
    fi
    stop_after speak
    train recipes/mini/speak_prosody.yaml speak_prosody
    snapshot speak_prosody --bf16
  fi
  stop_after speak_prosody
  train recipes/mini/reader_noisy.yaml reader_noisy
  snapshot reader_noisy --bf16
fi
stop_after reader_noisy
# agreement: the base's answers distilled into the LLM's LoRA, the spoken answers in the mix (release 6's deltas)
if ! restore hear_distill_s2s; then
  train recipes/mini/hear_distill_s2s.yaml hear_distill_s2s
  snapshot hear_distill_s2s --bf16
fi
# the answer's cue and prosody re-fitted on the distilled LLM (release 7's deltas; hearing unchanged)
if ! restore speak_prosody_r7; then
  train recipes/mini/speak_prosody_r7.yaml speak_prosody_r7
  snapshot speak_prosody_r7 --bf16
fi
# the paper's baseline for the merge starts where stage 1 did (trained here if missing, its deltas not shipped)
restore hear_reader || train recipes/mini/hear_reader.yaml hear_reader
train recipes/mini/single_stage_baseline.yaml single_stage_baseline

step "ship: assembly (models/mini holds speak_prosody_r7's deltas), evaluation"
"$fac" assets mini checkpoints/mini
"$fac" eval mini --model checkpoints/mini --data data/mini --split test --baseline runs/mini/single_stage_baseline/final \
  --latency 50 --compile --out runs/mini/eval --threads "$threads"
"$fac" eval mini-speech --model checkpoints/mini --data data/mini --split test --limit 300 --out runs/mini/eval-speech \
  --threads "$threads"

if [ "${K1:-0}" = 1 ]; then
  # the DRSR comparison (issue 14 must-show 5): the head-only stage with the LLM at 25 Hz (k = 1) for about the
  # compute of speak_srh's 150 steps at k = 5 (a k = 1 step costs 2.4-3.2x: bench/drsr.py, BENCHMARKS.md), both
  # scored on the same 10 test questions (30 s of speech each: 150 LLM steps at k = 5, 750 at k = 1)
  [ -d runs/mini/speak_srh_k1/final ] || { step "train recipes/mini/speak_srh.yaml at k = 1"
    "$fac" train recipes/mini/speak_srh.yaml --resume model.group_size=1 data.max_len=2048 train.steps=50 \
      run_dir=runs/mini/speak_srh_k1; }
  [ -d runs/detok ] || { mkdir -p runs/detok; echo '{"kind": "piper-joe"}' > runs/detok/detokenizer.json; }
  for k in 1 5; do
    run=$([ "$k" = 1 ] && echo speak_srh_k1 || echo speak_srh)
    "$fac" eval mini-speech --model "runs/mini/$run/final" --detokenizer runs/detok --data data/mini --split test \
      --limit 10 --no-variants --max-new-tokens $((150 * 5 / k)) --threads "$threads" --out "runs/mini/eval-drsr-k$k"
  done
fi
step "done"
