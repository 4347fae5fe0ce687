#!/usr/bin/env bash
# Builds the plain C driver-API client and runs it against the libcuda.so in LIBDIR
# (scripts/sim-lib prints that directory): sim/tests/client/run.sh "$(scripts/sim-lib | tail -1)"
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: $0 LIBDIR   (a directory holding libcuda.so)" >&2
    exit 2
fi
libdir="$(cd "$1" && pwd)"
if [ ! -e "$libdir/libcuda.so" ]; then
    echo "$0: no libcuda.so in $libdir" >&2
    exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
${CC:-gcc} -std=c11 -O1 -Wall -Wextra -Werror -o "$out/client" "$here/client.c" -ldl
LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$out/client"
