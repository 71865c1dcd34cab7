"""Third-party log lines that are noise in an sfn run, filtered where (and only where) they say nothing.

- DeepSpeed logs "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it." on
  import whenever it finds no GPU, in every run (and `sfn sweep --plan`), DeepSpeed used or not. Dropped when torch
  sees no CUDA GPU either: then sfn's own start-up lines already say what the run runs on.
- bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community ..." when it is imported on a CPU with
  AVX-512 BF16 (peft and transformers import it whether a run quantizes or not). Dropped unless the run asked for
  `quantize_frozen` (`keep_bitsandbytes_warnings`), where a slower 4-bit CPU kernel is worth knowing about.
"""

from __future__ import annotations

import logging

_state = {"bitsandbytes": False}


def _no_gpu() -> bool:
    import torch

    return not torch.cuda.is_available()


class _Drop(logging.Filter):
    def __init__(self, prefix: str, when):
        super().__init__()
        self.prefix, self.when = prefix, when

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith(self.prefix) and self.when())


def silence_known_noise() -> None:
    """Install the filters (once per process; before or after the libraries are imported)."""
    if _state.get("installed"):
        return
    _state["installed"] = True
    logging.getLogger("DeepSpeed").addFilter(_Drop("Setting accelerator to CPU", _no_gpu))
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        _Drop("Failed to load CPU gemm_4bit_forward", lambda: not _state["bitsandbytes"]))


def keep_bitsandbytes_warnings() -> None:
    """This run quantizes: bitsandbytes' kernel warnings are news, not noise."""
    _state["bitsandbytes"] = True
