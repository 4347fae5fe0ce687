#!/usr/bin/env bash
# Installs the CUDA 13.0 compiler (nvcc, NVVM, CRT headers, runtime headers, CCCL) from NVIDIA's
# Python wheels into a project-local, git-ignored venv: .toolchain/cuda-venv.
# Pinned to 13.0.x to match the H200 machine (CUDA 13.0, driver 580).
# Idempotent: returns in well under a second when the pinned versions are already present.
# Prints the nvcc path on its last line.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.toolchain/cuda-venv"
stamp="$venv/.lowbit-cuda-13.0-v1"
pins=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-cuda-runtime==13.0.96"
  "nvidia-cuda-cccl==13.0.85"
)
find_nvcc() { find "$venv" -path '*nvidia/cu13/bin/nvcc' -type f 2>/dev/null | head -n 1; }
if [[ -f $stamp ]] && nvcc=$(find_nvcc) && [[ -n $nvcc ]] && "$nvcc" --version >/dev/null 2>&1; then
  echo "$nvcc"
  exit 0
fi
py=${PYTHON:-python3}
command -v "$py" >/dev/null || { echo "install-cuda-toolchain: python3 not found" >&2; exit 1; }
echo "install-cuda-toolchain: installing ${pins[*]} into $venv" >&2
rm -rf "$venv"
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir "${pins[@]}" >&2
nvcc=$(find_nvcc)
[[ -n $nvcc ]] || { echo "install-cuda-toolchain: nvcc not found after install" >&2; exit 1; }
cu=$(dirname "$(dirname "$nvcc")")
# The wheels ship nvvm next to bin/ under some versions and as a sibling package under others;
# nvcc finds cicc through ../nvvm/bin, so make sure that path exists.
if [[ ! -x $cu/nvvm/bin/cicc ]]; then
  cicc=$(find "$venv" -name cicc -type f | head -n 1)
  [[ -n $cicc ]] && ln -sfn "$(dirname "$(dirname "$cicc")")" "$cu/nvvm"
fi
"$nvcc" --version >&2
touch "$stamp"
echo "$nvcc"
