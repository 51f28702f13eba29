#!/usr/bin/env bash
# One batched call on the H200 test machine (no network there: the wheel travels with the call):
#   GPU test suite (files in parallel groups: compile-bound, correctness only),
#   then tuning of the shape-A/B keys (alone on the GPU), then `vidrial bench`.
# Usage (device tool, carry .whl):  bash benchmarks/h200_session.sh [tests|compare|tune|tune_all|ship|fwdbwd|bench|profile|kernels|flash|layer ...]
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 VIDRIAL_CACHE_DIR=/tmp/vidrial-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TUNED=/tmp/tuned-run  # this call's tuned store (later steps, e.g. bench, dispatch from it); packed into $OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1
STEPS=${*:-tests tune bench}
TEST_BUDGET=${TEST_BUDGET:-270}; TUNE_TRIALS=${TUNE_TRIALS:-10}; BENCH_BUDGET=${BENCH_BUDGET:-90}

run_tests() {
  local groups=(${TEST_GROUPS:-
    "tests/gpu/test_backward_gpu.py"
    "tests/gpu/test_inference_gpu.py"
    "tests/gpu/test_forward_gpu.py"
    "tests/gpu/test_intra_chunk_attention_gpu.py tests/gpu/test_launch_gpu.py"
    "tests/gpu/test_update_state_gpu.py tests/gpu/test_dispatch_gpu.py tests/gpu/test_standard_shapes_gpu.py"
    "tests/gpu/test_tuner_gpu.py tests/gpu/test_bench_gpu.py"
    "tests/gpu/test_backward_sweep_gpu.py tests/gpu/test_tuner_fidelity_gpu.py"
    "tests/gpu/test_nn_gpu.py tests/gpu/test_context_parallel_gpu.py tests/gpu/test_varlen_gpu.py"})
  local i=0
  for g in "${groups[@]}"; do
    timeout "$TEST_BUDGET" python3 -m pytest -m gpu -v -rfEs -p no:cacheprovider $g > "$OUT/tests-$i.txt" 2>&1 &
    i=$((i + 1))
  done
  wait
  for f in "$OUT"/tests-*.txt; do [ -f "$f" ] || continue; echo "== $f: $(tail -1 "$f")"; done
  grep -h -E "^(FAILED|ERROR)" "$OUT"/tests-*.txt | head -40
}

run_tune() {
  # Shapes A (b=1,t=64k) and B (b=8,t=8k) at h=8, d=64, p=2, chunk 1024, bf16, gated; decode at b=1/8/64.
  local common="--trials $TUNE_TRIALS --timeout ${TUNE_TIMEOUT:-15} --out $OUT/tune --tuned-dir $TUNED --no-progress --job-timeout 60"
  local keys=(${TUNE_KEYS:-})  # space-separated family|json (no spaces inside the JSON); default: shapes A/B
  [ ${#keys[@]} -gt 0 ] || keys=(\
    'update_state|{"head_dim":64,"deg":2,"d_tile":8,"dtype":"bfloat16","chunk_size":1024,"gating":true,"bh_chunks_bucket":512}' \
    'intra_chunk_attention|{"head_dim":64,"deg":2,"dtype":"bfloat16","chunk_size":1024,"gating":true,"normalize":false,"bh_bucket":8,"t_bucket":65536}' \
    'intra_chunk_attention|{"head_dim":64,"deg":2,"dtype":"bfloat16","chunk_size":1024,"gating":true,"normalize":false,"bh_bucket":64,"t_bucket":8192}' \
    'query_state|{"head_dim":64,"deg":2,"d_tile":8,"dtype":"bfloat16","o_dtype":"float32","chunk_size":1024,"tokens":65536}' \
    'decode_step|{"head_dim":64,"deg":2,"d_tile":8,"dtype":"bfloat16","state_dtype":"float32","group":1,"q_len":1,"gating":true,"bh_bucket":64}' \
    'decode_step|{"head_dim":64,"deg":2,"d_tile":8,"dtype":"bfloat16","state_dtype":"float32","group":1,"q_len":1,"gating":true,"bh_bucket":8}' \
    'decode_step|{"head_dim":64,"deg":2,"d_tile":8,"dtype":"bfloat16","state_dtype":"float32","group":1,"q_len":1,"gating":true,"bh_bucket":512}')
  for k in "${keys[@]}"; do
    timeout $((${TUNE_TIMEOUT:-15} + 30)) python3 -m vidrial tune $common --kernel "${k%%|*}" --key "${k#*|}" 2>&1 | tail -8
  done
  VIDRIAL_TUNED_DIR=$TUNED python3 -m vidrial show 2>&1 | grep -E "tuned entries" || true
  # $OUT returns at most 8 files: the store and the reports travel as one archive (vidrial ship tuned/)
  cp -r "$TUNED" "$OUT/tuned" && tar -C "$OUT" -czf "$OUT/tune.tgz" tuned tune && rm -rf "$OUT/tuned" "$OUT/tune"
}

run_compare() {
  # issue 6: exhaustive grid at shape A, then TPE/GP/random replayed on its results (best after N trials vs
  # the exhaustive best); the grid's winner is recorded like any study's (run before `tune`, which packs $OUT)
  local k=${COMPARE_KEY:-'update_state|{"head_dim":64,"deg":2,"d_tile":8,"dtype":"bfloat16","chunk_size":1024,"gating":true,"bh_chunks_bucket":512}'}
  timeout $((${COMPARE_BUDGET:-240} + 60)) python3 -m vidrial tune --kernel "${k%%|*}" --key "${k#*|}" --sampler grid \
    --compare 5,10,20,40 --timeout "${COMPARE_BUDGET:-240}" --out "$OUT/tune/compare-${k%%|*}" --tuned-dir "$TUNED" \
    --no-progress --job-timeout 60 2>&1 | tee "$OUT/compare-${k%%|*}.txt" | tail -30
}

run_tune_all() {
  # Every family's shape keys (issue 7's shipped set), resumable across calls: the journal and the
  # store live in .tune-state/ (git-ignored; extract $OUT/tune-state.tgz here and carry .tune-state next time)
  mkdir -p .tune-state
  # TUNE_PRESET: shapes (default; what shipped configs must cover) or standard (also the other variants);
  # keys with a shipped entry are skipped (--skip-tuned), so a 10-trial study never replaces a longer one
  timeout "${TUNE_ALL_BUDGET:-480}" python3 -m vidrial tune --kernel all --preset "${TUNE_PRESET:-shapes}" \
    --trials "$TUNE_TRIALS" --skip-tuned \
    --timeout 20 --resume --out .tune-state/out --tuned-dir .tune-state/tuned --no-progress --job-timeout 60 \
    ${TUNE_GPUS:+--gpus $TUNE_GPUS} 2>&1 | tee "$OUT/tune-all.txt" | grep -v "^report:" | tail -40
  VIDRIAL_TUNED_DIR=.tune-state/tuned python3 -m vidrial show 2>&1 | grep -E "tuned entries" || true
  tar -czf "$OUT/tune-state.tgz" .tune-state
}

run_ship() {
  # this call's tune_all winners into the tree's tuned_configs/ (what later steps dispatch from; the same
  # `vidrial ship .tune-state/tuned` is then run on the returned state at home and committed)
  python3 -m vidrial ship .tune-state/tuned && find tuned_configs -name "*.lock" -delete
  python3 -m vidrial show 2>&1 | grep -E "^  \S|standard shapes" | tee "$OUT/show.txt"
}

run_fwdbwd() {
  # fwd+bwd at shape A (FWDBWD_SHAPES: e.g. A,B,A4) with the per-kernel split (the tuned store of the tree);
  # FWDBWD_ARGS e.g. --no-variants
  timeout "${FWDBWD_BUDGET:-200}" python3 benchmarks/bench_fwd_bwd.py --shapes ${FWDBWD_SHAPES:-A} --reps 10 ${FWDBWD_ARGS:-} 2>&1 | tee "$OUT/fwd-bwd.txt" | tail -40
}

run_bench() {
  VIDRIAL_TUNED_DIR=${BENCH_TUNED_DIR:-$TUNED} timeout $((BENCH_BUDGET + 120)) python3 -m vidrial bench --preset "${BENCH_PRESET:-quick}" \
    --budget "$BENCH_BUDGET" --out "$OUT/bench" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt" | tail -60
}

run_profile() {
  # Nsight Compute over one fwd+bwd at shape A (clocks left alone); text summary back in one file
  timeout 400 ncu --clock-control none --profile-from-start off --set full -o "$OUT/fwd_bwd" -f \
    python3 benchmarks/profile_fwd_bwd.py --shape A > "$OUT/ncu-run.txt" 2>&1
  ncu -i "$OUT/fwd_bwd.ncu-rep" --page details --csv > "$OUT/ncu-details.csv" 2>&1
  ncu -i "$OUT/fwd_bwd.ncu-rep" --print-summary per-kernel > "$OUT/ncu-summary.txt" 2>&1
  tail -40 "$OUT/ncu-summary.txt"
}

run_kernels() {
  # every GPU kernel of a fwd+bwd step (vidrial's and torch's glue) per shape in KERNELS_SHAPES (torch.profiler)
  for shape in ${KERNELS_SHAPES:-A}; do
    timeout 200 python3 benchmarks/profile_fwd_bwd.py --shape "$shape" --torch-profiler 2>&1 | tee "$OUT/kernels-$shape.txt" | tail -45
  done
}

run_flash() {
  # the opt-in backward kernels (flash intra, mma16 rows, update_state state pass, update_state_bwd mma16
  # via "mma16"): their GPU tests
  # (FLASH_K selects them), then fwd+bwd at shape A with each variant and the per-kernel split.
  timeout "$TEST_BUDGET" python3 -m pytest -m gpu -v -rfEs -p no:cacheprovider tests/gpu/test_backward_gpu.py \
    -k "${FLASH_K:-flash or mma16 or update_state}" > "$OUT/tests-flash.txt" 2>&1
  echo "== flash tests: $(tail -1 "$OUT/tests-flash.txt")"; grep -E "^(FAILED|ERROR)" "$OUT/tests-flash.txt" | head -20
  timeout 400 python3 benchmarks/bench_fwd_bwd.py --shapes A --reps 10 2>&1 | tee "$OUT/bench-flash.txt" | tail -40
}

run_layer() {
  # issue 20's targets: the layer's step vs the bare op + projections at shape B, packed (cu_seqlens) vs equal
  timeout 200 python3 benchmarks/bench_layer.py --reps 10 --out "$OUT/layer.json" 2>&1 | tee "$OUT/layer.txt" | tail -12
}

pack_out() {
  # the device returns at most 8 files from $OUT (more: some are left out, e.g. a tune-state archive was
  # lost that way): past 8, the text logs travel as one archive next to the other archives
  local n; n=$(find "$OUT" -maxdepth 1 -type f | wc -l)
  if [ "$n" -gt 8 ]; then
    (cd "$OUT" && tar -czf logs.tgz --remove-files $(ls *.txt | grep -v '^gpu.txt$'))
    echo "##### $n files in \$OUT: text logs packed into logs.tgz"
  fi
}

for s in $STEPS; do echo "##### $s $(date -u +%T)"; "run_$s"; done
pack_out
echo "##### done $(date -u +%T)"
