"""Keep packages a training run never uses out of its process.

Installed packages get imported whether a run uses them or not: TRL, transformers and accelerate import `peft`
whenever it is installed, and peft imports `bitsandbytes` (which loads torch's inductor and, on a CPU, prints
"Failed to load CPU gemm_4bit_forward from kernels-community" in every run); transformers' loss module imports
`scipy` (object-detection matching) for every model. A training run of sfn-train needs none of them: it trains the
real weights of the selected modules (`use_peft` is refused), causal-LM losses need no scipy, and
`quantize_frozen` imports bitsandbytes itself when it is asked for (peft is not on that path). Measured on the
reference machine (bench/import_cost.py, docs/benchmarks.md): they add ~90 MB to the peak RSS of every run and
seconds to its start.

How. Before transformers is imported, each name is set to None in `sys.modules`: the documented way to make an
import fail (`import peft` raises ModuleNotFoundError) and, what matters here, to make the availability checks of
transformers, TRL, accelerate and peft (`importlib.util.find_spec(name)`, which returns None for such an entry) see
the package as not installed, so that they take their no-peft/no-scipy paths instead of failing. Only the entry points
of a training process call this (`sfn train`, train/sft.py): a library caller's process is left as it is, and so is
any process that has already imported transformers (its availability answers may already be cached).
`SFN_KEEP_IMPORTS=1` in the environment turns it off.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("sfn_train")

UNUSED_IN_TRAINING = {
    "peft": "sfn-train trains the selected weights themselves (use_peft is refused); peft also imports bitsandbytes",
    "scipy": "imported by transformers' object-detection losses only",
}
KEEP_ENV = "SFN_KEEP_IMPORTS"


def keep_unused_packages_out() -> list[str]:
    """Block the packages of UNUSED_IN_TRAINING for the rest of this process; return the names blocked."""
    if os.environ.get(KEEP_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return []
    if "transformers" in sys.modules:  # too late to be consistent: leave this process as it is
        return []
    blocked = [name for name in UNUSED_IN_TRAINING if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]
    return blocked


def blocked_packages() -> list[str]:
    """The names this process blocks (for the log and the manifest)."""
    return sorted(name for name in UNUSED_IN_TRAINING if name in sys.modules and sys.modules[name] is None)
