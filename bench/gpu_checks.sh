#!/usr/bin/env bash
# The open issues' GPU checks as prepared commands for the device machine. Build and test on CPU
# first; then, per device call (10 minutes at most), the parts that fit, in this order (H200
# estimates with torch.compile; a fresh machine adds 1-2 minutes to start):
#
#   kernels    ~2 min  #3: the Triton kernels' tests compiled for real; fused vs eager vs compiled
#                          at R1's per-GPU shapes (bench/kernel_speed.py)
#   train      ~6 min  #3: baseline ms/step, tokens/s, MFU, peak memory with the fused kernels off
#                          and on; record at one GPU's share of its batch, fused + varlen, fused + FlexAttention
#   presets-a  ~6 min  #3: baseline, pr1383, pr1693 100 steps each at one GPU's share
#   presets-b  ~8 min  #3: pr1790, pr2116, record likewise
#   parity     ~6 min  #3 + #4: baseline preset vs the challenge's train_gpt.py, 200 steps on the
#                          same shards and seed; then the script's final_model.pt scored through
#                          int8_baseline (bench/reference_int8.py) beside the value it printed
#   steps      ~5 min  #3: the same comparison step by step from one initialization and the same
#                          batches, the script's own parts driven in its order (bench/reference_parity.py)
#   ttt        ~9 min  #5: record trained 240 s; flat, sliding and TTT on 500 val docs; the 8-GPU projection
#   varlen     ~3 min  #25: document attention through torch's varlen kernel vs compiled FlexAttention
#                          vs the exact per-segment path: logits and gradients on uneven documents,
#                          then ms and peak memory at R1's 98,304-token row (bench/varlen_attention.py)
#
#   device:  bash bench/gpu_checks.sh kernels train      (default: kernels train)
#   here:    PY=.venv/bin/python bash bench/gpu_checks.sh --cpu kernels    (checks the script)
#
# The device image's python3 has torch and triton but not brotli, zstandard, python-minifier:
# run bench/device_wheels.sh here once and carry .whl (and bench/reference for parity: the
# challenge's train_gpt.py, git-ignored, never committed). Real text comes from shared/corpus.
# $OUT (or bench/out) gets status.txt, summary.json and results.tgz (every log and JSON).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
DEVICE_ARGS=()
TRAIN_ARGS=()
if [ "${1:-}" = "--cpu" ]; then
  DEVICE_ARGS=(--device cpu --tiny); TRAIN_ARGS=(--device cpu --tiny --warmup-steps 1); shift
fi
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(kernels train)
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
LOGS=$(mktemp -d)
WORK=$(mktemp -d)  # shards and models: large, never brought back
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CORPUS=""
for c in shared/corpus/mixed_large.jsonl.gz ../shared/corpus/mixed_large.jsonl.gz; do
  [ -f "$c" ] && CORPUS="$c" && break
done
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --find-links .whl brotli zstandard python-minifier > "$LOGS/wheels.log" 2>&1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1; } > "$LOGS/machine.txt"

run() {  # run NAME SECONDS CMD...: one piece; its output in $LOGS/NAME.log, its status in status.txt
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  echo "$name rc=$? seconds=$((SECONDS - t0))" | tee -a "$OUT/status.txt"
}

steps() { [ ${#DEVICE_ARGS[@]} -gt 0 ] && echo 3 || echo "$1"; }

for part in "${PARTS[@]}"; do
  case $part in
    kernels)
      run kernel_tests 240 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py
      run kernel_speed 240 $PY bench/kernel_speed.py "${DEVICE_ARGS[@]}" --json "$LOGS/kernel_speed.json" ;;
    train)
      fused=(--set train.fused_cross_entropy=true --set train.fused_mlp=true)
      run train_baseline 170 $PY bench/train_throughput.py "${TRAIN_ARGS[@]}" --preset baseline --steps "$(steps 60)" \
        --json "$LOGS/train_baseline.json"
      run train_baseline_fused 170 $PY bench/train_throughput.py "${TRAIN_ARGS[@]}" --preset baseline \
        --steps "$(steps 60)" "${fused[@]}" --json "$LOGS/train_baseline_fused.json"
      # the record preset as it is (varlen attention, fused kernels: issue 25), then with FlexAttention
      run train_record_fused 200 $PY bench/train_throughput.py "${TRAIN_ARGS[@]}" --preset record --per-gpu \
        --steps "$(steps 60)" "${fused[@]}" --json "$LOGS/train_record_fused.json"
      run train_record_flex 200 $PY bench/train_throughput.py "${TRAIN_ARGS[@]}" --preset record --per-gpu \
        --steps "$(steps 60)" "${fused[@]}" --set train.model.doc_attention_kernel=flex \
        --json "$LOGS/train_record_flex.json" ;;
    varlen)
      if [ ${#DEVICE_ARGS[@]} -gt 0 ]; then
        run varlen 900 $PY bench/varlen_attention.py --device cpu --json "$LOGS/varlen.json"
      else
        run varlen 240 $PY bench/varlen_attention.py --json "$LOGS/varlen.json"
      fi ;;
    presets-a|presets-b)
      list=baseline,pr1383,pr1693
      [ "$part" = presets-b ] && list=pr1790,pr2116,record
      run "$part" 560 $PY bench/train_throughput.py "${TRAIN_ARGS[@]}" --preset "$list" --per-gpu \
        --steps "$(steps 100)" --json "$LOGS/$part.json" ;;
    parity)
      if [ ! -f bench/reference/train_gpt.py ]; then
        echo "parity: bench/reference/train_gpt.py is missing (see the header)" | tee -a "$OUT/status.txt"
        continue
      fi
      run parity 420 $PY bench/train_throughput.py "${TRAIN_ARGS[@]}" --preset baseline --steps "$(steps 200)" \
        --reference bench/reference/train_gpt.py ${CORPUS:+--corpus "$CORPUS"} --work "$WORK/parity" \
        --json "$LOGS/parity.json"
      read -r expect model shards tokenizer < <($PY -c "import json, sys
r = json.load(open(sys.argv[1]))['reference']
print(r.get('int8_zlib_val_bpb') or '-', r['final_model'], r['shards'], r['tokenizer'])" "$LOGS/parity.json" 2>/dev/null)
      if [ -n "${expect:-}" ] && [ "$expect" != "-" ] && [ -f "$model" ]; then
        run reference_int8 150 $PY bench/reference_int8.py --checkpoint "$model" --shards "$shards" \
          --tokenizer "$tokenizer" --expect "$expect"
        run reference_int8_code 150 $PY bench/reference_int8.py --checkpoint "$model" --shards "$shards" \
          --tokenizer "$tokenizer" --reference-code bench/reference/train_gpt.py
      fi ;;
    steps)
      if [ ! -f bench/reference/train_gpt.py ]; then
        echo "steps: bench/reference/train_gpt.py is missing (see the header)" | tee -a "$OUT/status.txt"
        continue
      fi
      if [ ${#DEVICE_ARGS[@]} -gt 0 ]; then
        run reference_parity 560 $PY bench/reference_parity.py --steps 4 --json "$LOGS/reference_parity.json"
      else
        run reference_parity 560 $PY bench/reference_parity.py --device cuda --full --steps 200 \
          ${CORPUS:+--corpus "$CORPUS"} --json "$LOGS/reference_parity.json"
      fi ;;
    ttt)
      run ttt 560 $PY bench/eval_ttt.py --preset record ${CORPUS:+--corpus "$CORPUS"} --set train.nproc=1 \
        --set train.max_wallclock_seconds=240 --set shards.val_docs=500 --out "$WORK/ttt" ;;
    *) echo "unknown part $part (kernels train presets-a presets-b parity steps ttt varlen)"; exit 2 ;;
  esac
done
# Every JSON result in one file the device tool brings back whole, and the figures on screen.
$PY - "$LOGS" "$OUT/summary.json" <<'PYEOF'
import json, pathlib, sys
logs = pathlib.Path(sys.argv[1])
summary = {p.stem: json.loads(p.read_text()) for p in sorted(logs.glob("*.json"))}
for p in sorted(logs.glob("*.log")):  # the benches without --json print their result last
    tail = p.read_text(errors="replace").strip().splitlines()[-40:]
    summary.setdefault(p.stem + "_tail", tail)
pathlib.Path(sys.argv[2]).write_text(json.dumps(summary, indent=1) + "\n")
for key, value in summary.items():
    if not key.endswith("_tail"):
        print(key, json.dumps(value)[:1500])
PYEOF
tar czf "$OUT/results.tgz" -C "$LOGS" .
rm -rf "$WORK"
cat "$OUT/status.txt"
