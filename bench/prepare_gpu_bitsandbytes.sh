#!/usr/bin/env bash
# Make a trimmed, unpacked bitsandbytes for the GPU machine, which has no
# bitsandbytes and no network. The wheel is 43 MB (CUDA 11.8 ... 13.2, ROCm,
# XPU builds); the GPU image runs torch 2.11+cu130, so keeping only the CPU,
# CUDA 13.0 and 13.2 libraries gives ~9 MB that fits the device tool's carry
# limit (64 MiB for the whole working tree).
#
# Usage (here, in the repo root, where pip can reach PyPI):
#     bash bench/prepare_gpu_bitsandbytes.sh [VERSION]      # default 0.50.2
# then on the GPU machine:
#     carry: ["bench/.site"]
#     PYTHONPATH=bench/.site python3 bench/bench_blockwise.py --device cuda
set -euo pipefail

VERSION="${1:-0.50.2}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SITE="$ROOT/bench/.site"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# bitsandbytes ships one py3-none wheel per platform; the GPU image is
# Python 3.12 on x86-64, manylinux >= 2.24.
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$TMP" "bitsandbytes==$VERSION"

rm -rf "$SITE"
mkdir -p "$SITE"
python3 - "$TMP" "$SITE" <<'EOF'
import pathlib, re, sys, zipfile
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
whl = next(src.glob("bitsandbytes-*.whl"))
keep_lib = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.endswith(".so") and not keep_lib.search(name):
            continue  # other CUDA/ROCm/XPU builds: not loadable on the cu130 image anyway
        z.extract(name, dst)
print("extracted", whl.name, "->", dst)
EOF

# The folder must be ignored by git for the device tool to carry it.
if ! git -C "$ROOT" check-ignore -q "bench/.site/x" 2>/dev/null; then
    EXCLUDE="$(git -C "$ROOT" rev-parse --git-path info/exclude)"
    case "$EXCLUDE" in /*) ;; *) EXCLUDE="$ROOT/$EXCLUDE" ;; esac
    mkdir -p "$(dirname "$EXCLUDE")"
    echo "/bench/.site/" >> "$EXCLUDE"
    echo "added /bench/.site/ to $EXCLUDE"
fi
du -sh "$SITE"
