#!/usr/bin/env bash
# Download the wheels tools/gpu_check/run.sh installs on a GPU node without network, into .whl/<part>/ (gitignored).
#
#   bash tools/gpu_check/prepare_wheels.sh            # all parts: .whl/common, .whl/train, .whl/quant
#   bash tools/gpu_check/prepare_wheels.sh quant      # one part
#
# Works in a fresh clone (no `make install` needed): every wheel is fetched for the node's platform (CPython 3.12,
# x86_64 manylinux) from the list in tools/gpu_check/wheels.txt; DeepSpeed, which PyPI has only as source, is built
# here as a pure-Python wheel in pip's isolated build environment (DS_BUILD_OPS=0: no torch needed; its CUDA ops, if
# ever needed, compile just in time on the node). Then tools/gpu_check/wheels.py checks every requirement, versions
# included, against the carried wheels and the node's recorded packages, and each invocation's size (common + its
# part + the working tree) against the 64 MiB a device call may carry. Exit 1 when it finds a problem.
set -euo pipefail
cd "$(dirname "$0")/../.."
LIST=tools/gpu_check/wheels.txt
PY=${PY:-python3}
PARTS=("$@")
[ $# -eq 0 ] && PARTS=(common train quant)

for part in "${PARTS[@]}"; do
    case "$part" in common|train|quant) ;; *) echo "prepare_wheels.sh: parts are common, train, quant, not $part" >&2; exit 2 ;; esac
    mkdir -p ".whl/$part"
    grep -E "^$part[[:space:]]" "$LIST" | while read -r _ req how _; do
        name=${req%%==*}
        if ls ".whl/$part/" 2>/dev/null | grep -qi "^${name//-/_}-${req##*==}-"; then
            echo "have  $part/$req"
            continue
        fi
        echo "get   $part/$req"
        if [ "$how" = "build" ]; then
            DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w ".whl/$part" "$req"
            continue
        fi
        extra=()
        case "$how" in manylinux_*) extra=(--platform "$how") ;; esac
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 "${extra[@]}" -d ".whl/$part" "$req"
    done
done
"$PY" tools/gpu_check/wheels.py --folder .whl
