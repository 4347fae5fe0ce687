#!/usr/bin/env bash
# Everything a GPU session should run, in one call on the GPU machine (no Rust needed there):
# the staged GPU tests, compute-sanitizer memcheck and racecheck on a representative subset,
# the benches, and the PyTorch peers in the same invocation. Logs go to $OUT (or /tmp/gpu-out).
#
# On the build machine:  ../shared/tools/gpu-stage --benches
# Then, with the device tool: run(command="bash scripts/gpu-session.sh [tests|sanitize|bench]...",
#                                 carry=[".gpu"])
# With no arguments it runs all three parts. One device call is limited to 10 minutes, so a
# session usually runs the parts as separate calls: `tests`, then `sanitize`, then `bench`.
# Exit status: non-zero if any part failed.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
parts=("$@")
[[ ${#parts[@]} -eq 0 ]] && parts=(tests sanitize bench)
status=0
bin() { ls "$root"/.gpu/bin/test/"$1"-* 2>/dev/null | head -n 1; }

for part in "${parts[@]}"; do
  case "$part" in
    tests)
      bash "$root/.gpu/run.sh" || status=1
      ;;
    sanitize)
      # Small but complete cases of every kernel family; memcheck then racecheck.
      subset=(
        "gpu_quant fake_quant_matches_reference_all_dtypes_and_groups"
        "gpu_quant non_finite_weights_are_reported_not_quantized"
        "gpu_marlin_layout repack_and_inverse_match_the_reference"
        "gpu_sync quantize_to_marlin_matches_the_reference"
        "gpu_marlin_gemm dense_grid_small_bf16"
        "gpu_marlin_gemm deterministic_across_runs"
        "gpu_marlin_moe_gemm moe_gemm_corrupt_expert_ids_are_skipped"
        "gpu_moe_routing align_is_deterministic_and_supports_expert_maps"
        "gpu_fused_moe bad_input_is_rejected_before_launch"
        "gpu_fused_moe expert_parallel_ranks_sum_to_the_full_layer"
      )
      for tool in memcheck racecheck; do
        for entry in "${subset[@]}"; do
          read -r test filter <<<"$entry"
          b=$(bin "$test")
          [[ -n $b ]] || { echo "!!! $test not staged"; status=1; continue; }
          echo "=== compute-sanitizer --tool $tool $test $filter"
          if ! LOWBIT_REQUIRE_GPU=1 compute-sanitizer --tool "$tool" --error-exitcode 99 \
              "$b" --test-threads=1 --exact "$filter" 2>&1 | tee -a "$out/sanitizer-$tool.log" | tail -n 5; then
            status=1
            echo "!!! $tool FAILED: $test $filter" | tee -a "$out/sanitizer-$tool.log"
          fi
        done
      done
      ;;
    bench)
      nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$out/bench-device.txt"
      for b in "$root"/.gpu/bin/bench/*; do
        [[ -x $b ]] || continue
        echo "=== bench $(basename "$b")"
        "$b" --bench 2>&1 | tee -a "$out/benches.log" || status=1
      done
      for p in quant marlin moe; do
        echo "=== peers_$p.py"
        python3 "$root/benches/peers_$p.py" 2>&1 | tee -a "$out/peers.log" || status=1
      done
      ;;
    *) echo "gpu-session: unknown part $part (tests, sanitize, bench)" >&2; exit 2 ;;
  esac
done
echo "gpu-session finished, status $status"
exit $status
