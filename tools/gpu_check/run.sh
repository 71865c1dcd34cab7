#!/usr/bin/env bash
# The prepared GPU check: every GPU path of sfn-train, PASS/FAIL with numbers (docs/development.md).
#
#   bash bench/gpu_check.sh --part train            # on a GPU node: installs .whl/common + .whl/train, then runs
#   bash bench/gpu_check.sh --part quant            # second invocation: .whl/common + .whl/quant (bitsandbytes)
#   bash bench/gpu_check.sh --dry-run               # here / in CI: the same steps with tiny models on the CPU
#
# Options: --part train|quant|all (default all), --dry-run, --wheels DIR (default .whl), --out DIR (default
# gpu_check_out; $OUT on the device tool), --only STEP,... / --skip STEP,..., --with-7b (throughput also on a
# Qwen2.5-7B shape), --device-transformers (do not install the carried transformers: run on the image's own, to see
# what breaks with it), --python PY.
# Exit status: 0 when no step failed (SKIPs allowed), 1 when one did, 2 for a usage or install error.
set -euo pipefail
cd "$(dirname "$0")/.."

PART=all DRY=0 WHEELS=.whl OUT_DIR=${OUT:-gpu_check_out} PY="" ONLY="" SKIP="" DEVICE_TRANSFORMERS=0 WITH_7B=""
while [ $# -gt 0 ]; do
    case "$1" in
        --part) PART=$2; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        --wheels) WHEELS=$2; shift 2 ;;
        --out) OUT_DIR=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        --skip) SKIP=$2; shift 2 ;;
        --python) PY=$2; shift 2 ;;
        --device-transformers) DEVICE_TRANSFORMERS=1; shift ;;
        --with-7b) WITH_7B=1; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$PART" in train|quant|all) ;; *) echo "gpu_check.sh: --part takes train, quant or all, not $PART" >&2; exit 2 ;; esac

if [ "$DRY" = 1 ]; then
    # Here: the project's virtual environment, nothing installed.
    PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
    exec "$PY" bench/gpu_check.py --dry-run --part "$PART" --out "$OUT_DIR" --only "$ONLY" --skip "$SKIP" ${WITH_7B:+--with-7b}
fi

# On the GPU node: install the carried wheels into a private folder (never into the image's environment), then
# sfn-train itself from this working tree, without dependencies.
PY=${PY:-python3}
SITE=${SFN_GPU_SITE:-/tmp/sfn-gpu-site}
parts=(common)
case "$PART" in all) parts+=(train quant) ;; *) parts+=("$PART") ;; esac
wheels=()
for p in "${parts[@]}"; do
    [ -d "$WHEELS/$p" ] || { echo "gpu_check.sh: $WHEELS/$p is missing: run bench/prepare_wheels.sh and carry it" >&2; exit 2; }
    for w in "$WHEELS/$p"/*.whl; do
        [[ "$DEVICE_TRANSFORMERS" = 1 && "$(basename "$w")" == transformers-* ]] && continue
        wheels+=("$w")
    done
done
echo "gpu_check.sh: installing ${#wheels[@]} wheels into $SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
    || { echo "gpu_check.sh: installing the wheels failed" >&2; exit 2; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
        --target "$SITE-sfn" . ; then
    export PYTHONPATH="$SITE-sfn:$PYTHONPATH"
else
    echo "gpu_check.sh: installing sfn-train from the working tree failed; using the source tree on PYTHONPATH instead"
    export PYTHONPATH="$PWD:$PYTHONPATH"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
cd /tmp   # import sfn_train from the installed copy, not from this folder
exec "$PY" "$OLDPWD/bench/gpu_check.py" --part "$PART" --out "$( cd "$OLDPWD" && mkdir -p "$OUT_DIR" && cd "$OUT_DIR" && pwd )" \
    --only "$ONLY" --skip "$SKIP" ${WITH_7B:+--with-7b}
