#!/usr/bin/env bash
# Installs the CUDA 13.0 compiler (nvcc, NVVM, CRT headers, runtime headers, CCCL) and the SASS
# tools (cuobjdump, nvdisasm; used by scripts/sass-report) from NVIDIA's Python wheels into a
# project-local, git-ignored venv: .toolchain/cuda-venv.
# Pinned to 13.0.x to match the H200 machine (CUDA 13.0, driver 580). cuobjdump and nvdisasm
# have no 13.0.x wheels on PyPI (the first is 13.2.51), so they are pinned to the latest 13.2
# patch release; a newer disassembler reads the sm_90a/sm_80 cubins of nvcc 13.0.
# Idempotent: returns in well under a second when the pinned versions are already present. An
# install made by an earlier version of this script is upgraded in place (only the missing wheels
# are downloaded).
# Prints the nvcc path on its last line.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.toolchain/cuda-venv"
stamp="$venv/.lowbit-cuda-13.0-v2"
pins=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-cuda-runtime==13.0.96"
  "nvidia-cuda-cccl==13.0.85"
  "nvidia-cuda-cuobjdump==13.2.86"
  "nvidia-cuda-nvdisasm==13.2.86"
)
find_nvcc() { find "$venv" -path '*nvidia/cu13/bin/nvcc' -type f 2>/dev/null | head -n 1; }
# nvcc, cuobjdump and nvdisasm all run.
tools_run() {
  local nvcc bin
  nvcc=$(find_nvcc) && [[ -n $nvcc ]] || return 1
  bin=$(dirname "$nvcc")
  "$nvcc" --version >/dev/null 2>&1 && "$bin/cuobjdump" --version >/dev/null 2>&1 &&
    "$bin/nvdisasm" --version >/dev/null 2>&1
}
if [[ -f $stamp ]] && tools_run; then
  find_nvcc
  exit 0
fi
py=${PYTHON:-python3}
pipi() { "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir "$@" >&2; }
if [[ -x $venv/bin/python ]] && [[ -n $(find_nvcc) ]] && "$(find_nvcc)" --version >/dev/null 2>&1; then
  # An earlier install (e.g. stamp v1: compiler only): add what is missing; pip keeps the
  # already-satisfied pins.
  echo "install-cuda-toolchain: updating $venv to ${pins[*]}" >&2
  pipi "${pins[@]}"
else
  command -v "$py" >/dev/null || { echo "install-cuda-toolchain: python3 not found" >&2; exit 1; }
  echo "install-cuda-toolchain: installing ${pins[*]} into $venv" >&2
  rm -rf "$venv"
  "$py" -m venv "$venv"
  pipi "${pins[@]}"
fi
nvcc=$(find_nvcc)
[[ -n $nvcc ]] || { echo "install-cuda-toolchain: nvcc not found after install" >&2; exit 1; }
cu=$(dirname "$(dirname "$nvcc")")
# The wheels ship nvvm next to bin/ under some versions and as a sibling package under others;
# nvcc finds cicc through ../nvvm/bin, so make sure that path exists.
if [[ ! -x $cu/nvvm/bin/cicc ]]; then
  cicc=$(find "$venv" -name cicc -type f | head -n 1)
  [[ -n $cicc ]] && ln -sfn "$(dirname "$(dirname "$cicc")")" "$cu/nvvm"
fi
tools_run || { echo "install-cuda-toolchain: nvcc, cuobjdump or nvdisasm does not run after install" >&2; exit 1; }
"$nvcc" --version >&2
rm -f "$venv"/.lowbit-cuda-13.0-v1
touch "$stamp"
echo "$nvcc"
