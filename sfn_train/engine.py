"""The distributed engine of a run: which one was asked for, which one runs, and the two must agree.

Three things can name an engine: the recipe (`deepspeed: <config>`, or `fsdp` + `fsdp_config`), the accelerate
launcher (`accelerate launch --config_file ds_configs/accelerate_*.yaml` passes its choice to the process as
`ACCELERATE_USE_DEEPSPEED` / `ACCELERATE_USE_FSDP` environment variables), and nothing (plain DDP under torchrun, or
one process). The HF Trainer resolves a disagreement silently: a recipe's `deepspeed:` wins over the launcher's
config, and an FSDP request is dropped on CPU (accelerate 1.15 turns FSDP on only for GPU-like distributed types, see
`AcceleratorState.__init__`). Here a disagreement is refused before anything loads, and once training starts the
engine actually in effect is read from the live model (DTensor parameters for FSDP2, partitioned parameters for
ZeRO-3) and compared with the request; the result goes into the manifest.

FSDP2 on CPU: accelerate's FSDP2 code (`fsdp2_prepare_model`: `fully_shard` per decoder layer, fp32 masters for
trainable tensors only, gathered `get_state_dict`, sharded or full checkpoints) runs on CPU with gloo unchanged; only
the gate in `AcceleratorState` keeps it off. `SfnTrainer` (sfn_train/trainer.py) opens that gate for FSDP version 2
on CPU, in the same way accelerate itself switches a CPU state to DeepSpeed, so CPU runs and tests take the code path
GPU runs take.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from .errors import SfnError

logger = logging.getLogger("sfn_train")

LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
FSDP1_FROZEN_REASON = ("FSDP1 flattens each wrapped block into one parameter that shares one requires_grad; with "
                       "use_orig_params it trains, but keeps gradient memory for the frozen tensors as if they "
                       "trained (pytorch #104690), and o_proj sits inside every decoder layer")


# --------------------------------------------------------------------------------------------------------------------
# What was asked for
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class EngineRequest:
    """The engine a run was asked to use, and who asked (`recipe` or `accelerate launch`)."""

    engine: str | None  # deepspeed_zero{0..3}, fsdp1, fsdp2, ddp (a launcher's explicit plain data parallel), None
    source: str | None = None
    config: str | None = None  # the DeepSpeed config file / fsdp_config that names it, for messages and the manifest

    def to_dict(self) -> dict:
        return {"engine": self.engine, "source": self.source, "config": self.config}


def launched_by_accelerate() -> bool:
    """`accelerate launch` exports these for every distributed type (ACCELERATE_DYNAMO_BACKEND for DDP and FSDP)."""
    return any(k in os.environ for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP",
                                         "ACCELERATE_DYNAMO_BACKEND"))


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def launcher_request() -> EngineRequest:
    """The engine an `accelerate launch --config_file ...` asked for, read from the environment it set."""
    if not launched_by_accelerate():
        return EngineRequest(None)
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if config_file and config_file != "none":
            stage = _read_json(config_file, "the accelerate config's deepspeed_config_file").get(
                "zero_optimization", {}).get("stage", 0)
        else:
            stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
            config_file = None
        return EngineRequest(f"deepspeed_zero{int(stage)}", "accelerate launch", config_file)
    if _env_true("ACCELERATE_USE_FSDP"):
        version = os.environ.get("FSDP_VERSION", "1")  # accelerate's own default when the YAML omits fsdp_version
        return EngineRequest(f"fsdp{int(version)}", "accelerate launch")
    return EngineRequest("ddp", "accelerate launch")


def recipe_request(training_args) -> EngineRequest:
    """The engine the recipe (or its command-line flags) names: `deepspeed: <config>`, or `fsdp` + `fsdp_config`."""
    ds = getattr(training_args, "hf_deepspeed_config", None)
    if training_args.deepspeed and ds is not None:
        stage = int(ds.config.get("zero_optimization", {}).get("stage", 0))
        config = training_args.deepspeed if isinstance(training_args.deepspeed, str) else "(inline dict)"
        return EngineRequest(f"deepspeed_zero{stage}", "recipe", config)
    plugin_args = getattr(training_args, "fsdp_plugin_args", None)
    if training_args.fsdp and plugin_args is not None:
        return EngineRequest(f"fsdp{plugin_args['fsdp_version']}", "recipe", "fsdp_config")
    return EngineRequest(None)


def effective_deepspeed_config(training_args) -> dict | None:
    """The DeepSpeed config the Trainer will use: the recipe's, else the accelerate launcher's (None: no DeepSpeed)."""
    ds = getattr(training_args, "hf_deepspeed_config", None)
    if training_args.deepspeed and ds is not None:
        return ds.config
    plugin = getattr(training_args, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "hf_ds_config", None) is not None:
        return plugin.hf_ds_config.config
    if plugin is not None:
        return {"zero_optimization": {"stage": plugin.zero_stage,
                                      "offload_optimizer": {"device": plugin.offload_optimizer_device},
                                      "offload_param": {"device": plugin.offload_param_device}}}
    return None


def _read_json(path: str, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SfnError(f"{what} {path} cannot be read ({type(exc).__name__}): check the path (relative paths start "
                       "from the launch folder).") from None


# --------------------------------------------------------------------------------------------------------------------
# Start-up checks (before anything loads)
# --------------------------------------------------------------------------------------------------------------------
def check_engine(training_args, sfn_args) -> EngineRequest:
    """Refuse the engine set-ups that would train differently from what was asked, or fail late; return the request."""
    if training_args.deepspeed and training_args.fsdp:
        raise SfnError("the recipe sets both `deepspeed` and `fsdp`: pick one engine (remove the other key).")
    recipe, launcher = recipe_request(training_args), launcher_request()
    _check_launcher_agrees(training_args, recipe, launcher)
    request = recipe if recipe.engine else launcher  # the recipe's, else the launcher's
    if request.engine and request.engine.startswith("fsdp"):
        _check_fsdp(training_args, sfn_args, request)
    ds_config = effective_deepspeed_config(training_args)
    if ds_config is not None:
        check_optimizer_offload(ds_config)
    return request


def _check_launcher_agrees(training_args, recipe: EngineRequest, launcher: EngineRequest) -> None:
    """The recipe and `accelerate launch --config_file` must not name different engines or DeepSpeed configs.

    The HF Trainer would silently use the recipe's: `accelerate_zero3_offload.yaml` with a recipe that names
    zero3.json would not offload, and `accelerate_ddp.yaml` with such a recipe would still run DeepSpeed.
    """
    if not recipe.engine or not launcher.engine:
        return
    other = "launch with the accelerate config that names the recipe's engine (ds_configs/accelerate_*.yaml)"
    if launcher.engine == "ddp":
        drop = "--fsdp ''" if recipe.engine.startswith("fsdp") else "--deepspeed ''"
        raise SfnError(f"the accelerate config asks for plain data parallel (no DeepSpeed or FSDP) but the recipe sets "
                       f"{_recipe_key(recipe)}, which the Trainer would run instead, silently: pass {drop} to train "
                       f"with plain DDP, or {other}.")
    same = recipe.engine == launcher.engine
    if same and recipe.engine.startswith("deepspeed") and launcher.config:
        recipe_config = training_args.hf_deepspeed_config.config
        if isinstance(training_args.deepspeed, str):
            recipe_config = _read_json(training_args.deepspeed, "the recipe's deepspeed config")
        same = recipe_config == _read_json(launcher.config, "the accelerate config's deepspeed_config_file")
    if not same:
        launcher_says = launcher.engine + (f" ({launcher.config})" if launcher.config else "")
        use = f"pass --deepspeed {launcher.config} to use the launcher's" if launcher.config else \
            "drop the recipe's engine on the command line (--deepspeed '' / --fsdp '') to use the launcher's"
        raise SfnError(f"the accelerate config asks for {launcher_says} but the recipe sets {_recipe_key(recipe)}, "
                       f"which the Trainer would use instead, silently: {use}, or {other}.")
    logger.info("engine: %s, named by both the recipe and the accelerate config.", recipe.engine)


def _recipe_key(recipe: EngineRequest) -> str:
    if recipe.engine.startswith("deepspeed"):
        return f"deepspeed: {recipe.config} ({recipe.engine})"
    return f"fsdp with fsdp_config version {recipe.engine[-1]}"


def _check_fsdp(training_args, sfn_args, request: EngineRequest) -> None:
    import torch

    version = int(request.engine[-1])
    partial = sfn_args.trainable_modules != ["all"] or sfn_args.trainable_layers != ["all"]
    if version == 1 and partial and not sfn_args.allow_fsdp1:
        raise SfnError(f"FSDP1 with part of the model frozen is refused: {FSDP1_FROZEN_REASON}; use FSDP2 "
                       "(fsdp_config version: 2, ds_configs/fsdp2.json), or set allow_fsdp1: true to run it anyway.")
    if version == 1 and partial:
        logger.warning("allow_fsdp1: running FSDP1 with frozen parameters although %s.", FSDP1_FROZEN_REASON)
    if version == 1 and not torch.cuda.is_available():
        raise SfnError("FSDP1 runs only on GPUs (accelerate turns FSDP on for GPU-like devices only): use FSDP2 "
                       "(fsdp_config version: 2), which sfn-train also runs on CPU.")
    if sfn_args.quantize_frozen != "none":
        raise SfnError(f"quantize_frozen: {sfn_args.quantize_frozen} runs single-process or with DDP, not under FSDP: "
                       "remove `fsdp` from the recipe or set quantize_frozen: none.")
    plugin_args = getattr(training_args, "fsdp_plugin_args", None) or {}
    fsdp_checkpointing = plugin_args.get("activation_checkpointing", _env_true("FSDP_ACTIVATION_CHECKPOINTING"))
    if fsdp_checkpointing and training_args.gradient_checkpointing:  # the Trainer raises too, after the model loads
        raise SfnError("fsdp_config activation_checkpointing and gradient_checkpointing are both on: keep one "
                       "(FSDP's own saves an all-gather per layer in the backward pass).")
    if "SHARDED" in str(_fsdp_state_dict_type(training_args)) and training_args.save_only_model:
        raise SfnError("save_only_model does not work with fsdp_config state_dict_type SHARDED_STATE_DICT (the "
                       "Trainer refuses it): use FULL_STATE_DICT, or drop save_only_model.")


def _fsdp_state_dict_type(training_args) -> str | None:
    plugin_args = getattr(training_args, "fsdp_plugin_args", None)
    if plugin_args:
        return plugin_args.get("state_dict_type")
    return os.environ.get("FSDP_STATE_DICT_TYPE")


def check_optimizer_offload(ds_config: dict) -> None:
    """ZeRO optimizer offload runs DeepSpeed's `cpu_adam` op: say now that it compiles on first use, or cannot."""
    zero = ds_config.get("zero_optimization", {})
    device = (zero.get("offload_optimizer") or {}).get("device", "none")
    if str(device).lower() in ("none", "", "null"):
        return
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return  # no DeepSpeed: the Trainer says so itself
    if installed_ops.get("cpu_adam"):
        return
    missing = [tool for tool, found in (("a C++ compiler (c++)", shutil.which(os.environ.get("CXX", "c++"))),
                                        ("ninja", _ninja())) if not found]
    if missing:
        raise SfnError(f"ZeRO offload_optimizer (device {device}) needs DeepSpeed's cpu_adam op, which this DeepSpeed "
                       f"install does not include and cannot compile here (missing {' and '.join(missing)}): install "
                       "them, or reinstall with DS_BUILD_CPU_ADAM=1 pip install deepspeed, or drop the offload.")
    logger.warning("ZeRO offload_optimizer (device %s): DeepSpeed's cpu_adam op is not prebuilt in this install, so "
                   "it is compiled on first use (C++ compiler + ninja, a few minutes, once per machine); prebuild "
                   "with DS_BUILD_CPU_ADAM=1 pip install deepspeed.", device)


def _ninja() -> bool:
    try:
        from torch.utils.cpp_extension import verify_ninja_availability

        verify_ninja_availability()
        return True
    except (ImportError, RuntimeError):
        return False


# --------------------------------------------------------------------------------------------------------------------
# A world of one process, when no launcher set one up
# --------------------------------------------------------------------------------------------------------------------
def needs_world_of_one(training_args) -> bool:
    """DeepSpeed and FSDP need torch.distributed even in one process; without a launcher there is no rendezvous.

    DeepSpeed's `init_distributed` then falls back to MPI discovery (an `mpi4py` import error), and the Trainer
    refuses FSDP outside distributed training.
    """
    wants = bool(training_args.deepspeed) or bool(training_args.fsdp)
    return wants and not any(k in os.environ for k in LAUNCHER_ENV)


def set_world_of_one() -> int:
    """What `torchrun --nproc_per_node 1` would export: rank 0 of 1 on 127.0.0.1 and a free port; returns the port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    logger.info("no launcher: DeepSpeed/FSDP run as a world of one process (rank 0 of 1, 127.0.0.1:%d), as "
                "`torchrun --nproc_per_node 1` would set it up.", port)
    return port


# --------------------------------------------------------------------------------------------------------------------
# FSDP2 on CPU (SfnTrainer switches it on) and the final save
# --------------------------------------------------------------------------------------------------------------------
def enable_fsdp2_on_cpu(trainer) -> bool:
    """Switch a CPU (gloo) accelerator state to FSDP when FSDP2 was asked for; True if it did.

    accelerate 1.15 sets `distributed_type = FSDP` only for MULTI_GPU-like types and leaves MULTI_CPU as plain DDP,
    so the FSDP plugin built from the recipe (or from `accelerate launch`'s environment) is dropped. Everything
    downstream (prepare, backward, clipping, state dicts, checkpoints) keys on that one field.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if getattr(state, "fsdp_plugin", None) is not None or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    if trainer.args.fsdp_plugin_args is not None:
        plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    elif _env_true("ACCELERATE_USE_FSDP"):
        plugin = FullyShardedDataParallelPlugin()
    else:
        return False
    if plugin.fsdp_version != 2:
        return False  # FSDP1 needs a GPU; refused at start-up, and the engine check would catch it
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)  # as AcceleratorState does for its FSDP branch
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    logger.info("FSDP2 on CPU: accelerate's FSDP2 path enabled for the gloo process group.")
    return True


def final_save_gathered(trainer) -> None:
    """Make `trainer.save_model` write the full, gathered weights even when checkpoints are sharded.

    Under FSDP the Trainer saves weights only for FULL_STATE_DICT; with SHARDED_STATE_DICT (accelerate's FSDP2
    default, the scalable choice for resume checkpoints) the output folder would hold no model at all.
    """
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if trainer.is_fsdp_enabled and plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
        plugin.set_state_dict_type("FULL_STATE_DICT")


def warn_fsdp_low_precision(loaded_dtypes: dict, training_args) -> None:
    """FSDP keeps fp32 masters of the trained tensors only under bf16/fp16 mixed precision (accelerate's FSDP2
    upcast); without it a bf16 base trains its selected tensors in bf16, where small updates round away."""
    import torch

    low = [n for n, d in loaded_dtypes.items() if d in (torch.bfloat16, torch.float16)]
    if low and not (training_args.bf16 or training_args.fp16):
        logger.warning("FSDP without bf16/fp16 mixed precision trains the %d %s tensors selected in that dtype (no "
                       "fp32 masters; small updates round away): set bf16: true.", len(low),
                       str(loaded_dtypes[low[0]]).removeprefix("torch."))


def cast_saved_tensors(output_dir, dtypes: dict, model=None) -> list[str]:
    """Cast the named tensors of the saved checkpoint in `output_dir` to `dtypes` (name -> torch dtype), file by file.

    Under FSDP2 with bf16/fp16 mixed precision, accelerate trains fp32 masters of the trainable tensors and the
    gathered checkpoint holds them in fp32; the project's convention (sfn_train/precision.py) is a checkpoint in the
    dtype the base was loaded in and the fp32 masters in the plugin, so the plugin is written first and the checkpoint's
    copies are then rounded to nearest here. `dtypes` names in-memory parameters; with `model` (the trained model)
    they are translated to the checkpoint's names (a fused expert tensor is stored as one tensor per expert, see
    sfn_train.names). Returns the checkpoint names cast.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from .checkpoint import Checkpoint, atomic_file
    from .names import NameMap

    saved = Checkpoint(output_dir)
    if model is not None:
        names = NameMap.from_model(model, saved.names)
        dtypes = {disk: dtype for name, dtype in dtypes.items() for disk in names.disk_names_of(name) or [name]}
    codes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
    stored = {n: codes.get(t.dtype) for n, t in saved.tensors.items()}
    cast = sorted(n for n, dtype in dtypes.items() if stored.get(n) not in (None, dtype))
    for file, infos in saved.iter_by_file():
        names = {t.name for t in infos} & set(cast)
        if not names:
            continue
        tensors = load_file(file)
        for name in names:
            tensors[name] = tensors[name].to(dtypes[name])
        with atomic_file(file) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})
    return cast


# --------------------------------------------------------------------------------------------------------------------
# What runs: read from the live objects once training has started
# --------------------------------------------------------------------------------------------------------------------
def engine_in_effect(trainer) -> dict:
    """The engine training really uses, from the wrapped model, its parameters and the optimizer."""
    import torch
    from torch.distributed.tensor import DTensor

    wrapped, model = trainer.model_wrapped, trainer.model
    params = list(model.named_parameters())
    frozen: dict[str, int] = {}
    trainable: dict[str, int] = {}
    for _, p in params:
        bucket = trainable if p.requires_grad else frozen
        key = str(p.dtype).replace("torch.", "")
        bucket[key] = bucket.get(key, 0) + 1
    found = {"processes": trainer.args.world_size, "parameter_tensors": len(params),
             "dtypes": {"trainable": trainable, "frozen": frozen}}
    sharded = sum(isinstance(p, DTensor) for _, p in params)
    if trainer.is_deepspeed_enabled and hasattr(wrapped, "zero_optimization_stage"):
        stage = int(wrapped.zero_optimization_stage())
        found["engine"] = f"deepspeed_zero{stage}"
        if stage == 3:
            found["partitioned_params"] = sum(hasattr(p, "ds_tensor") for _, p in params)
        return found
    if sharded:
        found["engine"] = "fsdp2"
        found["sharded_dtensor_params"] = sharded
    elif wrapped.__class__.__name__ == "FullyShardedDataParallel":
        found["engine"] = "fsdp1"
    elif isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        found["engine"] = "ddp"
    else:
        found["engine"] = "single_process" if trainer.args.world_size == 1 else "unwrapped"
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    if optimizer is not None:
        opt_params = [p for group in optimizer.param_groups for p in group["params"]]
        found["optimizer_tensors"] = len(opt_params)
    return found


def mismatch(request: EngineRequest, found: dict) -> str | None:
    """Why the engine in effect is not the one asked for (None when it is)."""
    asked, got = request.engine, found["engine"]
    if asked is None or asked == got:
        if asked == "deepspeed_zero3" and not found.get("partitioned_params"):
            return "ZeRO-3 is on, but no parameter is partitioned"
        return None
    if asked == "ddp" and got in ("ddp", "single_process"):
        return None
    why = f"{request.source} asks for {asked}, but training runs as {got}"
    if asked.startswith("fsdp") and got in ("ddp", "unwrapped"):
        why += " (no parameter is a sharded DTensor: the FSDP settings were dropped)"
    return why
