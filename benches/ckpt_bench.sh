#!/usr/bin/env bash
# Checkpoint conversion on the CPU: lowbit quantize / repack / restore against compressed-tensors'
# own conversion of the same BF16 data, timed with /usr/bin/time -v (wall clock, max RSS).
#
#   benches/ckpt_bench.sh [DIR] [LAYERS] [RUNS]
#
# DIR (default /tmp/lowbit-ckpt-bench) receives the generated BF16 checkpoint (benches/ckpt_gen.py,
# LAYERS decoder layers, default 21: about 2.2 GB) and the outputs. Each lowbit step runs RUNS
# times (default 3). The compressed-tensors side runs once when PYTHON (default python3) can
# import torch and compressed_tensors; otherwise it is skipped with the reason. GB/s is the
# command's input bytes over wall-clock seconds; outputs are fsynced (lowbit) as part of the run.
# OUT (default DIR) is where the outputs go: OUT=/dev/shm/... takes the disk out of the
# measurement (the input stays where it is, in the page cache after the first run).
set -euo pipefail
DIR=${1:-/tmp/lowbit-ckpt-bench}
LAYERS=${2:-21}
RUNS=${3:-3}
PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
cargo build --release --quiet --bin lowbit --manifest-path "$ROOT/Cargo.toml"
LOWBIT=$CARGO_TARGET_DIR/release/lowbit
mkdir -p "$DIR"
OUT=${OUT:-$DIR}
mkdir -p "$OUT"
SRC=$DIR/bf16
if [ ! -f "$SRC/model.safetensors.index.json" ]; then
  rm -rf "$SRC"
  "$PYTHON" "$ROOT/benches/ckpt_gen.py" "$SRC" "$LAYERS"
fi
bytes() { du -b --apparent-size -c "$1"/*.safetensors | tail -1 | cut -f1; }
largest() { python3 - "$1" <<'PY'
import json, struct, sys, os
best = 0
for f in os.listdir(sys.argv[1]):
    if f.endswith(".safetensors"):
        b = open(os.path.join(sys.argv[1], f), "rb").read(8)
        n = struct.unpack("<Q", b)[0]
        h = json.loads(open(os.path.join(sys.argv[1], f), "rb").read(8 + n)[8:])
        for k, v in h.items():
            if k != "__metadata__":
                best = max(best, v["data_offsets"][1] - v["data_offsets"][0])
print(best)
PY
}
# run NAME INPUT_DIR OUTPUT_DIR CMD...: prints one result line
run() {
  local name=$1 in=$2 out=$3; shift 3
  rm -rf "$out"
  sync
  local log; log=$(mktemp)
  local so; so=$(mktemp)
  /usr/bin/time -v "$@" >"$so" 2>"$log" || { cat "$log"; exit 1; }
  grep -h "GB/s" "$so" | sed 's/^/#   (own timer, imports excluded) /' || true
  rm -f "$so"
  local wall rss
  wall=$(grep "Elapsed (wall clock)" "$log" | awk '{print $NF}' | awk -F: '{ if (NF==3) print $1*3600+$2*60+$3; else print $1*60+$2 }')
  rss=$(grep "Maximum resident set size" "$log" | awk '{print $NF}')
  local user sys; user=$(grep "User time" "$log" | awk '{print $NF}'); sys=$(grep "System time" "$log" | awk '{print $NF}')
  local b; b=$(bytes "$in")
  printf "%-22s in %6.3f GB  wall %6.2f s  %6.3f GB/s  cpu %5.2f s  max RSS %5d MB\n" \
    "$name" "$(echo "$b/1000000000" | bc -l)" "$wall" "$(echo "$b/1000000000/$wall" | bc -l)" "$(echo "$user+$sys" | bc -l)" "$((rss / 1024))"
  rm -f "$log"
}
echo "# $(date -u +%F) $(git -C "$ROOT" rev-parse --short HEAD) $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "# input: $(bytes "$SRC") bytes BF16, largest tensor $(largest "$SRC") bytes; outputs in $OUT ($(df --output=fstype "$OUT" | tail -1)); load average $(cut -d' ' -f1-3 /proc/loadavg)"
for i in $(seq "$RUNS"); do
  run "lowbit quantize -g 32" "$SRC" "$OUT/q32" "$LOWBIT" quantize -g 32 --device cpu "$SRC" "$OUT/q32"
done
for i in $(seq "$RUNS"); do
  run "lowbit repack" "$OUT/q32" "$OUT/m32" "$LOWBIT" repack "$OUT/q32" "$OUT/m32"
done
for i in $(seq "$RUNS"); do
  run "lowbit restore" "$OUT/m32" "$OUT/r32" "$LOWBIT" restore "$OUT/m32" "$OUT/r32"
done
diff -r "$OUT/q32" "$OUT/r32" >/dev/null && echo "# restore(repack(q)) == q byte for byte"
if "$PYTHON" -c "import torch, compressed_tensors" 2>/dev/null; then
  run "compressed-tensors g32" "$SRC" "$OUT/ct32" "$PYTHON" "$ROOT/benches/ckpt_peer_ct.py" "$SRC" "$OUT/ct32" 32
else
  echo "# compressed-tensors: skipped ($PYTHON cannot import torch and compressed_tensors; set PYTHON)"
fi
