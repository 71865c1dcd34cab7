"""`sfn train` exactly as train/sft.py runs it, plus `sfn_train.memory.measure`'s step-peak callback: each rank writes
what the CPU allocator held during one optimizer step to `$SFN_MEASURE_DIR/rank<R>.json` (tests/test_memory.py).

    python tests/measured_run.py --config RECIPE.yaml [--key value ...]
    accelerate launch --config_file ds_configs/accelerate_fsdp2.yaml tests/measured_run.py --config RECIPE.yaml
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> int:
    import sfn_train.train as train
    from sfn_train.cli import main as sfn_main
    from sfn_train.memory.measure import step_peak_callback

    out = Path(os.environ["SFN_MEASURE_DIR"])
    callback = step_peak_callback(step=1)
    run_sft = train.run_sft
    train.run_sft = lambda *args, callbacks=None: run_sft(*args, callbacks=[*(callbacks or []), callback])
    code = sfn_main(["train", *sys.argv[1:]])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(callback.result))
    return code


if __name__ == "__main__":
    sys.exit(main())
