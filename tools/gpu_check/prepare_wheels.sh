#!/usr/bin/env bash
# Download the wheels bench/gpu_check.sh installs on a GPU node without network, into .whl/<part>/ (gitignored).
#
#   bash bench/prepare_wheels.sh            # all parts: .whl/common, .whl/train, .whl/quant
#   bash bench/prepare_wheels.sh quant      # one part
#
# Every wheel is fetched for the node's platform (CPython 3.12, x86_64 manylinux) with exactly the pip command in
# docs/development.md, from the list in bench/gpu_wheels.txt; DeepSpeed, which PyPI has only as source, is built
# here as a pure-Python wheel (DS_BUILD_OPS=0: its CUDA ops, if ever needed, compile just in time on the node).
# Afterwards every wheel's Requires-Dist is checked against the carried wheels and the node's package list, and each
# invocation's size (common + its part) against the 64 MiB a device call may carry.
set -euo pipefail
cd "$(dirname "$0")/.."
LIST=bench/gpu_wheels.txt
PARTS=("${@:-common train quant}")
[ $# -eq 0 ] && PARTS=(common train quant)
BUILD_PY=${BUILD_PY:-.venv/bin/python}   # a Python with torch, to build DeepSpeed's wheel

for part in "${PARTS[@]}"; do
    mkdir -p ".whl/$part"
    grep -E "^$part[[:space:]]" "$LIST" | while read -r _ req how _; do
        name=${req%%==*}
        if ls ".whl/$part/" 2>/dev/null | grep -qi "^${name//-/_}-${req##*==}-"; then
            echo "have  $part/$req"
            continue
        fi
        echo "get   $part/$req"
        if [ "$how" = "build" ]; then
            DS_BUILD_OPS=0 "$BUILD_PY" -m pip wheel -q --no-deps --no-build-isolation -w ".whl/$part" "$req"
            continue
        fi
        extra=()
        case "$how" in manylinux_*) extra=(--platform "$how") ;; esac
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 "${extra[@]}" -d ".whl/$part" "$req"
    done
done
"$BUILD_PY" bench/gpu_check.py wheels --folder .whl
