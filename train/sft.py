"""Launch entry point for torchrun / accelerate:

    torchrun --nproc_per_node 8 train/sft.py --config recipes/qwen2.5-math-1.5b/oproj_s1k.yaml
    accelerate launch --config_file ds_configs/accelerate_zero3.yaml train/sft.py --config recipes/...yaml

Same keys and behaviour as `sfn train`; all logic lives in `sfn_train.train`.
"""

import sys

from sfn_train.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
