#!/usr/bin/env bash
# The prepared GPU check: every GPU path of sfn-train, PASS/FAIL with numbers (docs/development.md).
#
#   bash tools/gpu_check/run.sh --part quant      # on a GPU node, first (cheapest): .whl/common + .whl/quant
#   bash tools/gpu_check/run.sh --part train      # then: .whl/common + .whl/train (capped to end within 7 minutes)
#   bash tools/gpu_check/run.sh --dry-run         # here / in CI: the same steps with tiny models on the CPU
#
# Options: --part quant|train (on a node; `all` only with --dry-run: the two together carry over 64 MiB), --dry-run,
# --wheels DIR (default .whl), --out DIR (default $OUT on the device tool, else gpu_check_out), --only STEP,... /
# --skip STEP,..., --budget SECONDS (default 390 train, 180 quant), --keep-going (run even when env finds unmet
# requirements), --with-7b (throughput also on a Qwen2.5-7B shape), --device-transformers (do not install the carried
# transformers: run on the image's own, to see what breaks with it), --python PY.
# Output: OUT/gpu_check.json, OUT/steps.log (every step's full log), OUT/console.log (this script's output).
# Exit status: 0 when no step failed (SKIPs allowed), 1 when one did, 2 for a usage or install error.
set -euo pipefail
cd "$(dirname "$0")/../.."

PART="" DRY=0 WHEELS=.whl OUT_DIR=${OUT:-gpu_check_out} PY="" PASS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --part) PART=$2; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        --wheels) WHEELS=$2; shift 2 ;;
        --out) OUT_DIR=$2; shift 2 ;;
        --python) PY=$2; shift 2 ;;
        --only|--skip|--budget) PASS+=("$1" "$2"); shift 2 ;;
        --with-7b|--keep-going) PASS+=("$1"); shift ;;
        --device-transformers) DEVICE_TRANSFORMERS=1; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ -z "$PART" ] && PART=$([ "$DRY" = 1 ] && echo all || echo "")
case "$PART" in
    train|quant) ;;
    all) [ "$DRY" = 1 ] || { echo "run.sh: --part all carries more than one device call may (64 MiB): run --part quant, then --part train" >&2; exit 2; } ;;
    "") echo "run.sh: name the part: --part quant (first, cheapest), then --part train" >&2; exit 2 ;;
    *) echo "run.sh: --part takes quant or train (or all with --dry-run), not $PART" >&2; exit 2 ;;
esac
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
rm -f "$OUT_DIR/steps.log"
exec > >(tee "$OUT_DIR/console.log") 2>&1

if [ "$DRY" = 1 ]; then
    # Here: the project's virtual environment, nothing installed.
    PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
    exec "$PY" tools/gpu_check/check.py --dry-run --part "$PART" --out "$OUT_DIR" "${PASS[@]}"
fi

# On the GPU node: install the carried wheels into a private folder (never into the image's environment), then
# sfn-train itself from this working tree, without dependencies.
PY=${PY:-python3}
SITE=${SFN_GPU_SITE:-/tmp/sfn-gpu-site}
wheels=()
for p in common "$PART"; do
    [ -d "$WHEELS/$p" ] || { echo "run.sh: $WHEELS/$p is missing: run tools/gpu_check/prepare_wheels.sh and carry it" >&2; exit 2; }
    for w in "$WHEELS/$p"/*.whl; do
        [[ "${DEVICE_TRANSFORMERS:-0}" = 1 && "$(basename "$w")" == transformers-* ]] && continue
        wheels+=("$w")
    done
done
echo "run.sh: installing ${#wheels[@]} wheels into $SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
    || { echo "run.sh: installing the wheels failed" >&2; exit 2; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
        --target "$SITE-sfn" . ; then
    export PYTHONPATH="$SITE-sfn:$PYTHONPATH"
else
    echo "run.sh: installing sfn-train from the working tree failed; using the source tree on PYTHONPATH instead"
    export PYTHONPATH="$PWD:$PYTHONPATH"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
cd /tmp   # import sfn_train from the installed copy, not from this folder
exec "$PY" "$OLDPWD/tools/gpu_check/check.py" --part "$PART" --out "$OUT_DIR" "${PASS[@]}"
