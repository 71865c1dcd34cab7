"""Distributed engines: DeepSpeed in one process, FSDP2 on 2 CPU processes, two-node launches on one machine, and
the checks that a run gets the engine it asked for (recipe vs accelerate launcher, FSDP1 with frozen parameters,
FSDP dropped, ZeRO offload's compiled optimizer).

The multi-process runs look at the live objects through tests/observed_run.py (DTensor shards, ZeRO-3 partitions,
gradients, optimizer state), not only at what sfn-train writes about itself.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import REPO, changed_tensors, load_tensors, one_line_error, train_recipe, write_recipe
from sfn_train.cli import main

O_PROJ = {f"model.layers.{i}.self_attn.o_proj.weight" for i in range(4)}
OBSERVED = REPO / "tests" / "observed_run.py"
FSDP2 = dict(fsdp=True, fsdp_config=str(REPO / "ds_configs" / "fsdp2.json"))


def clean_env(**extra) -> dict:
    """The environment of a user's shell: no launcher variables (pytest may run under one), one thread each."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith(("ACCELERATE_", "FSDP_"))}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO), **extra}


def run(cmd: list[str], env: dict, expect: int = 0, timeout: int = 600) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    log = proc.stdout + proc.stderr
    assert proc.returncode == expect, log[-6000:]
    return log


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def observed(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory) -> Path:
    """A bf16 checkpoint: under `bf16: true` accelerate keeps fp32 masters of the trainable tensors only, so a frozen
    tensor that stays bf16 and bitwise equal shows that nothing frozen was upcast (accelerate #3844)."""
    from sfn_train.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen2_bf16", "qwen2", seed=0, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------------
# Start-up checks (in-process, before any model loads)
# ---------------------------------------------------------------------------------------------------------------------
def accelerate_env(monkeypatch, engine: str, config: str | None = None) -> None:
    """What `accelerate launch --config_file ds_configs/accelerate_<engine>.yaml` exports to the training process."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    if engine == "deepspeed":
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(REPO / "ds_configs" / config))
    elif engine == "fsdp2":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        monkeypatch.setenv("FSDP_VERSION", "2")
        monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    else:
        monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")


@pytest.mark.parametrize("launcher, config, recipe_keys, expected", [
    ("deepspeed", "zero3_offload.json", {"deepspeed": "zero3.json"},
     "accelerate config asks for deepspeed_zero3 ({ds}/zero3_offload.json) but the recipe sets deepspeed: "
     "{ds}/zero3.json (deepspeed_zero3), which the Trainer would use instead, silently: pass --deepspeed "
     "{ds}/zero3_offload.json"),
    ("ddp", None, {"deepspeed": "zero2.json"},
     "accelerate config asks for plain data parallel (no DeepSpeed or FSDP) but the recipe sets deepspeed: "
     "{ds}/zero2.json (deepspeed_zero2), which the Trainer would run instead, silently: pass --deepspeed ''"),
    ("fsdp2", None, {"deepspeed": "zero3.json"}, "accelerate config asks for fsdp2 but the recipe sets deepspeed"),
    ("deepspeed", "zero2.json", {**FSDP2}, "accelerate config asks for deepspeed_zero2 ({ds}/zero2.json) but the "
     "recipe sets fsdp with fsdp_config version 2"),
], ids=["zero3-offload-vs-zero3", "ddp-vs-zero2", "fsdp2-vs-zero3", "zero2-vs-fsdp2"])
def test_launcher_and_recipe_naming_different_engines_is_refused(tmp_path, capsys, monkeypatch, qwen2_base, sum_data,
                                                                launcher, config, recipe_keys, expected):
    ds = REPO / "ds_configs"
    accelerate_env(monkeypatch, launcher, config)
    keys = {k: str(ds / v) if k == "deepspeed" else v for k, v in recipe_keys.items()}
    recipe = train_recipe(tmp_path, qwen2_base, sum_data, **keys)
    assert main(["train", "--config", str(recipe)]) == 2
    assert expected.format(ds=ds) in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_launcher_and_recipe_naming_the_same_engine_agree(tmp_path, monkeypatch, qwen2_base, sum_data, caplog):
    from sfn_train.config import parse_recipe
    from sfn_train.engine import check_engine

    accelerate_env(monkeypatch, "deepspeed", "zero3.json")
    recipe = train_recipe(tmp_path, qwen2_base, sum_data, deepspeed=str(REPO / "ds_configs" / "zero3.json"))
    _, training_args, _, sfn_args = parse_recipe(["--config", str(recipe)])
    caplog.set_level(logging.INFO, logger="sfn_train")
    assert check_engine(training_args, sfn_args).to_dict() == {
        "engine": "deepspeed_zero3", "source": "recipe", "config": str(REPO / "ds_configs" / "zero3.json")}
    assert "deepspeed_zero3, named by both the recipe and the accelerate config" in caplog.text
    # the launcher alone names the engine when the recipe names none
    _, training_args, _, sfn_args = parse_recipe(["--config", str(train_recipe(tmp_path, qwen2_base, sum_data))])
    assert check_engine(training_args, sfn_args).to_dict()["source"] == "accelerate launch"


def test_fsdp1_with_frozen_parameters_is_refused(tmp_path, capsys, qwen2_base, sum_data):
    recipe = train_recipe(tmp_path, qwen2_base, sum_data, fsdp="full_shard", fsdp_config={"version": 1})
    assert main(["train", "--config", str(recipe)]) == 2
    line = one_line_error(capsys)
    assert "FSDP1 with part of the model frozen is refused" in line and "pytorch #104690" in line
    assert "set allow_fsdp1: true" in line
    # insisting passes that check; on a machine without a GPU the next one says FSDP1 cannot run here
    assert main(["train", "--config", str(recipe), "--allow_fsdp1", "true"]) == 2
    assert "FSDP1 runs only on GPUs" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_zero_offload_says_up_front_that_cpu_adam_is_compiled(monkeypatch, caplog):
    import deepspeed.git_version_info

    from sfn_train import engine
    from sfn_train.errors import SfnError

    offload = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    monkeypatch.setitem(deepspeed.git_version_info.installed_ops, "cpu_adam", False)
    monkeypatch.setattr(engine, "_ninja", lambda: True)
    monkeypatch.setattr(engine.shutil, "which", lambda name: "/usr/bin/" + name)
    caplog.set_level(logging.WARNING, logger="sfn_train")
    engine.check_optimizer_offload(offload)
    assert "cpu_adam op is not prebuilt in this install, so it is compiled on first use" in caplog.text
    monkeypatch.setattr(engine.shutil, "which", lambda name: None)
    with pytest.raises(SfnError, match="cannot compile here \\(missing a C\\+\\+ compiler"):
        engine.check_optimizer_offload(offload)
    monkeypatch.setitem(deepspeed.git_version_info.installed_ops, "cpu_adam", True)  # prebuilt: nothing to say
    engine.check_optimizer_offload(offload)
    engine.check_optimizer_offload(json.loads((REPO / "ds_configs" / "zero3.json").read_text()))  # no offload


def test_shipped_accelerate_configs_and_recipes_name_the_same_engine():
    """Each recipe's `accelerate launch --config_file X` line names an accelerate config whose engine is the
    recipe's own: the run would otherwise be refused (or, before, silently use the recipe's)."""
    checked = 0
    for recipe in sorted((REPO / "recipes").rglob("*.yaml")):
        raw = yaml.safe_load(recipe.read_text())
        for line in recipe.read_text().splitlines():
            if "accelerate launch" not in line or "--config_file" not in line:
                continue
            launcher = yaml.safe_load((REPO / line.split("--config_file")[1].split()[0]).read_text())
            if launcher["distributed_type"] == "DEEPSPEED":
                launcher_file = REPO / launcher["deepspeed_config"]["deepspeed_config_file"]
                assert raw.get("deepspeed"), recipe
                recipe_file = REPO / raw["deepspeed"]
                assert json.loads(launcher_file.read_text()) == json.loads(recipe_file.read_text()), recipe
            elif launcher["distributed_type"] == "FSDP":
                assert not raw.get("deepspeed") and raw.get("fsdp"), recipe
                assert launcher["fsdp_config"]["fsdp_version"] == 2
                assert json.loads((REPO / raw["fsdp_config"]).read_text())["version"] == 2, recipe
            else:
                assert not raw.get("deepspeed") and not raw.get("fsdp"), recipe
            checked += 1
    assert checked >= 15


def test_fsdp_checkpoint_completeness(tmp_path):
    """Both FSDP checkpoint layouts are resumable only when whole: DCP folders need every rank and `.metadata`."""
    from sfn_train.resume import problems

    def torch_file(path):
        torch.save({"x": torch.zeros(1)}, path)

    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    for name in ("scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"):
        torch_file(folder / name)
    for stem in ("pytorch_model_fsdp_0", "optimizer_0"):  # SHARDED_STATE_DICT
        (folder / stem).mkdir()
        for f in (".metadata", "__0_0.distcp", "__1_0.distcp"):
            (folder / stem / f).write_bytes(b"x")
    assert problems(folder, 2) == []
    (folder / "optimizer_0" / "__1_0.distcp").unlink()
    (folder / "pytorch_model_fsdp_0" / ".metadata").unlink()
    assert problems(folder, 2) == ["pytorch_model_fsdp_0 has no .metadata (the save did not finish)",
                                   "optimizer_0 holds shards of 1 process(es) for 2"]
    for stem in ("pytorch_model_fsdp_0", "optimizer_0"):  # FULL_STATE_DICT
        shutil.rmtree(folder / stem)
        torch_file(folder / f"{stem[:-2]}.bin")
    assert problems(folder, 2) == []
    os.truncate(folder / "optimizer.bin", 10)
    assert problems(folder, 2) == ["optimizer.bin is not a complete torch file (BadZipFile)"]


def test_deepspeed_or_fsdp_without_a_launcher_sets_up_a_world_of_one(monkeypatch):
    """What `sfn train` does before the model loads when a recipe names DeepSpeed or FSDP and no launcher ran: the
    environment of `torchrun --nproc_per_node 1`, and the device set-up redone so that the Trainer sees it. Under a
    launcher nothing is changed. (The slow test runs it end to end.)"""
    from types import SimpleNamespace

    from sfn_train.startup import init_distributed

    world = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    for name in {*world, "OMPI_COMM_WORLD_RANK", "PMI_RANK"}:
        monkeypatch.setenv(name, "unset")  # recorded, so that the test leaves the environment as it found it
        monkeypatch.delenv(name)
    args = SimpleNamespace(deepspeed=None, fsdp="full_shard", hf_deepspeed_config=None, deepspeed_plugin=None,
                           device="cpu", _setup_devices="cached before the world existed")
    init_distributed(args)
    assert {n: os.environ[n] for n in world[:5]} == dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                                                          LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    assert 0 < int(os.environ["MASTER_PORT"]) < 65536 and "_setup_devices" not in vars(args)
    launched = SimpleNamespace(**{**vars(args), "_setup_devices": "cached"})
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    init_distributed(launched)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], launched._setup_devices) == ("1", "2", "cached")


@pytest.fixture
def world_of_one():
    """A gloo process group of one process in this test's own process, taken down afterwards."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_engine_in_effect_is_read_from_the_live_model(world_of_one):
    """Which engine runs, from the wrapped model and its parameters: FSDP2 DTensors, a DDP wrapper, ZeRO-3
    partitions, or nothing; and a request the live model contradicts is named. (Slow tests run the real engines.)"""
    from types import SimpleNamespace

    from torch.distributed.fsdp import fully_shard

    from sfn_train.engine import EngineRequest, engine_in_effect, mismatch
    from sfn_train.tiny import tiny_model

    def trainer(model, wrapped=None, deepspeed=False):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        return SimpleNamespace(model=model, model_wrapped=wrapped or model, is_deepspeed_enabled=deepspeed,
                               optimizer=optimizer, args=SimpleNamespace(world_size=1))

    def model():
        m = tiny_model("qwen2", hidden=32, layers=2)
        for name, p in m.named_parameters():
            p.requires_grad_("o_proj" in name)
        return m

    plain = model()
    n = len(list(plain.parameters()))
    single = engine_in_effect(trainer(plain))
    assert (single["engine"], single["processes"], single["optimizer_tensors"]) == ("single_process", 1, 2)
    ddp = engine_in_effect(trainer(plain, torch.nn.parallel.DistributedDataParallel(plain)))
    assert ddp["engine"] == "ddp"
    sharded = model()
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    fsdp2 = engine_in_effect(trainer(sharded))
    assert fsdp2["engine"] == "fsdp2" and fsdp2["sharded_dtensor_params"] == n
    zero = model()
    wrapped = SimpleNamespace(zero_optimization_stage=lambda: 3)
    assert engine_in_effect(trainer(zero, wrapped, deepspeed=True))["engine"] == "deepspeed_zero3"
    for p in zero.parameters():
        p.ds_tensor = p.data.view(-1)[:1]  # what ZeRO-3 leaves on a partitioned parameter
    assert engine_in_effect(trainer(zero, wrapped, deepspeed=True))["partitioned_params"] == n

    fsdp2_asked = EngineRequest("fsdp2", "recipe", "fsdp_config")
    assert mismatch(fsdp2_asked, fsdp2) is None
    assert mismatch(fsdp2_asked, ddp) == ("recipe asks for fsdp2, but training runs as ddp (no parameter is a sharded "
                                          "DTensor: the FSDP settings were dropped)")
    assert mismatch(EngineRequest("deepspeed_zero3", "recipe"), {"engine": "deepspeed_zero3"}) == \
        "ZeRO-3 is on, but no parameter is partitioned"
    assert mismatch(EngineRequest("ddp", "accelerate launch"), single) is None


def test_fsdp_precision_record_says_what_the_engine_did():
    """Under FSDP the engine decides the trained tensors' dtype (accelerate's FSDP2 upcasts them to fp32 under mixed
    precision, and leaves them as loaded without): the manifest's record follows the live parameters, not a guess."""
    from types import SimpleNamespace

    from sfn_train.precision import keep_fp32_masters, precision_record
    from sfn_train.tiny import tiny_model

    args = SimpleNamespace(deepspeed=None, fsdp=["full_shard"], bf16=True, fp16=False)
    for engine_upcasts in (True, False):
        model = tiny_model("qwen2").to(torch.bfloat16)
        masters = keep_fp32_masters(model, sorted(O_PROJ), args)
        assert masters.engine == "fsdp" and all(p.dtype == torch.bfloat16 for p in model.parameters())
        if engine_upcasts:  # what accelerate's fsdp2_prepare_model does before fully_shard under bf16
            for name, p in model.named_parameters():
                if name in O_PROJ:
                    p.data = p.data.float()
        record = precision_record(model, sorted(O_PROJ), masters, args)
        assert record["master_weights"] == "fsdp"
        assert record["upcast_from"] == (["bfloat16"] if engine_upcasts else [])
        assert sorted(record["left_in_low_precision"]) == ([] if engine_upcasts else sorted(O_PROJ))
        assert record["trainable_dtypes"] == {"float32" if engine_upcasts else "bfloat16": 4}


# ---------------------------------------------------------------------------------------------------------------------
# Multi-process runs
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json"])
def test_deepspeed_in_one_process_without_a_launcher(tmp_path, qwen2_base, sum_data, ds_config):
    """`sfn train` with a `deepspeed:` recipe and no launcher: a world of one, not an mpi4py traceback."""
    recipe = train_recipe(tmp_path, qwen2_base, sum_data, deepspeed=str(REPO / "ds_configs" / ds_config))
    log = run([sys.executable, "-m", "sfn_train.cli", "train", "--config", str(recipe)], clean_env())
    assert "no launcher: DeepSpeed/FSDP run as a world of one process (rank 0 of 1, 127.0.0.1:" in log
    out = tmp_path / "out"
    changed, unchanged = changed_tensors(qwen2_base, out)
    assert changed == O_PROJ and len(unchanged) == 47
    manifest = json.loads((out / "sfn_manifest.json").read_text())
    stage = int(ds_config[4])
    assert manifest["world_size"] == 1 and manifest["deepspeed_stage"] == stage
    effect = manifest["engine"]["in_effect"]
    assert effect["engine"] == f"deepspeed_zero{stage}" and effect["processes"] == 1
    if stage == 3:
        assert effect["partitioned_params"] == 51


def check_fsdp2_observations(records: list[dict], base: Path) -> None:
    """Per rank, during training: every parameter a DTensor holding its share, gradients and optimizer state only
    for the trainable tensors, frozen tensors in their stored dtype."""
    stored = {n: str(t.dtype).replace("torch.", "") for n, t in load_tensors(base).items()}
    assert len(records) == 2
    for record in records:
        params = record["params"]
        assert record["model_class"].startswith("FSDP")
        assert all(p["dtensor"] for p in params.values()) and len(params) == 51
        assert {n for n, p in params.items() if p["requires_grad"]} == O_PROJ
        assert set(record["grads"]) == O_PROJ  # no gradient for a frozen tensor
        assert record["optimizer"]["params"] == sorted(O_PROJ) and set(record["optimizer"]["state"]) == O_PROJ
        assert {n: p["dtype"] for n, p in params.items() if n not in O_PROJ} == \
            {n: d for n, d in stored.items() if n not in O_PROJ}
    for name in params:  # sharded: each rank holds part, together the whole tensor
        shares = [r["params"][name]["local_numel"] for r in records]
        assert sum(shares) == params[name]["numel"] and max(shares) < params[name]["numel"], name


FSDP2_RUN = dict(**FSDP2, dtype="bfloat16", bf16=True, per_device_train_batch_size=2, max_steps=6,
                 save_strategy="steps", save_steps=2, logging_steps=1, disable_tqdm=True)


def two_nodes(script: Path, recipe: Path, env: dict) -> list[str]:
    """Two `torchrun --nnodes 2 --node_rank 0/1` launches of one process each, with a c10d rendezvous on 127.0.0.1:
    what two Slurm nodes run (docs/distributed.md), on one machine."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                               "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                               f"127.0.0.1:{port}", "--rdzv_id", "sfn-test", str(script), "--config", str(recipe)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
             for rank in (0, 1)]
    logs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n=====\n".join(log[-4000:] for log in logs)
    # the output is written once: by global rank 0, on whichever node the rendezvous made it
    assert sum(log.count("saved checkpoint, plugin and manifest") for log in logs) == 1, logs
    return logs


def run_and_kill(command: list[str], env: dict, marker: Path, timeout: int = 600) -> None:
    """Start a torchrun launch; SIGKILL the launcher and every worker once `marker` exists."""
    import signal
    import time

    import psutil

    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {marker.name} was written"
            assert time.monotonic() < deadline, f"{marker} was not written within {timeout} s"
            time.sleep(0.01)
    finally:
        try:
            family = [proc, *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = [proc]
        for p in family:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family[1:], timeout=60)
        proc.wait()


def check_partial_fsdp2_checkpoint(checkpoint: Path, base: Path) -> None:
    """An FSDP2 checkpoint of an o_proj run holds the trained tensors only, as fp32 shards of each rank (a DCP
    folder), with the training state and the record of the base (sfn_train/partial_checkpoints.py)."""
    from torch.distributed.checkpoint import FileSystemReader

    files = {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file()}
    assert files == {"sfn_checkpoint.json", "trainer_state.json", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth",
                     *(f"{d}/{f}" for d in ("pytorch_model_fsdp_0", "optimizer_0")
                       for f in (".metadata", "__0_0.distcp", "__1_0.distcp"))}, files  # no model.safetensors
    stored = FileSystemReader(str(checkpoint / "pytorch_model_fsdp_0")).read_metadata().state_dict_metadata
    assert set(stored) == {f"model.{name}" for name in O_PROJ}  # nothing frozen
    assert {str(stored[f"model.{name}"].properties.dtype) for name in O_PROJ} == {"torch.float32"}  # the masters
    trained_bytes = sum(4 * t.numel() for name, t in load_tensors(base).items() if name in O_PROJ)
    shards = sum(p.stat().st_size for p in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))
    frozen_bytes = sum(t.nbytes for name, t in load_tensors(base).items() if name not in O_PROJ)
    assert trained_bytes <= shards < trained_bytes + 16_384 < frozen_bytes, (shards, trained_bytes, frozen_bytes)
    record = json.loads((checkpoint / "sfn_checkpoint.json").read_text())
    assert record["engine"] == "fsdp2" and set(record["trained_tensors"]) == O_PROJ
    assert record["base_fingerprint"] == json.loads((checkpoint.parent / "sfn_manifest.json").read_text())["base"][
        "fingerprint"]


@pytest.mark.slow
def test_fsdp2_two_nodes_then_killed_and_resumed(tmp_path, bf16_base, sum_data):
    """FSDP2 on two CPU processes (gloo), bf16 base with `bf16: true`, as two one-process `torchrun --nnodes 2`
    launches: the model is really sharded (each rank holds part of every tensor as a DTensor), only o_proj gets
    gradients and optimizer state, frozen tensors stay bf16 and bitwise the base, the output is written once.
    Then the same run as one 2-process launch, killed after its first checkpoint and resumed: the checkpoint holds
    only the trained tensors' shards, the resumed process rebuilds the rest from the base, runs only the remaining
    steps and ends bitwise where the uninterrupted run ended."""
    reference = tmp_path / "two_nodes"
    recipe = train_recipe(tmp_path, bf16_base, sum_data, **{**FSDP2_RUN, "output_dir": str(reference / "out")})
    two_nodes(OBSERVED, recipe, clean_env(SFN_OBSERVE_DIR=str(reference / "observed")))
    records = observed(reference / "observed")
    check_fsdp2_observations(records, bf16_base)
    assert all(r["start_step"] == 0 and r["steps"] == 6 for r in records)
    changed, unchanged = changed_tensors(bf16_base, reference / "out")
    assert changed == O_PROJ and len(unchanged) == 47  # the output folder holds the gathered, whole checkpoint
    from safetensors.torch import load_file

    plugin = load_file(reference / "out" / "sfn_plugin.safetensors")
    assert set(plugin) == O_PROJ and {t.dtype for t in plugin.values()} == {torch.float32}  # accelerate's fp32 masters
    assert {t.dtype for t in load_tensors(reference / "out").values()} == {torch.bfloat16}  # the checkpoint: as loaded
    manifest = json.loads((reference / "out" / "sfn_manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["engine"]["requested"]["engine"] == "fsdp2"
    assert manifest["engine"]["in_effect"]["sharded_dtensor_params"] == 51
    precision = manifest["precision"]  # accelerate made fp32 masters of o_proj, and of nothing frozen
    assert precision["upcast_from"] == ["bfloat16"] and precision["left_in_low_precision"] == []
    assert precision["trainable_dtypes"] == {"float32": 4} and precision["frozen_dtypes"] == {"bfloat16": 47}

    killed = tmp_path / "killed"
    killed.mkdir()
    recipe = train_recipe(killed, bf16_base, sum_data, **{**FSDP2_RUN, "output_dir": str(killed / "out")})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(OBSERVED),
               "--config", str(recipe)]
    run_and_kill(command, clean_env(), killed / "out" / "checkpoint-2" / "trainer_state.json")
    assert json.loads((killed / "out" / "sfn_manifest.json").read_text())["status"] == "running"
    check_partial_fsdp2_checkpoint(killed / "out" / "checkpoint-2", bf16_base)

    resumed = write_recipe(killed / "resume.yaml", **{**yaml.safe_load(recipe.read_text()),
                                                      "resume_from_checkpoint": True})
    log = run([*command[:-1], str(resumed)], clean_env(SFN_OBSERVE_DIR=str(killed / "observed")))
    start = observed(killed / "observed")[0]["start_step"]
    assert start >= 2 and f"resume: from {killed / 'out' / f'checkpoint-{start}'}" in log
    assert "trained tensors (FSDP2 shards) of checkpoint-" in log  # the base, then the checkpoint's shards
    assert all(r["steps"] == 6 - start for r in observed(killed / "observed"))  # only the remaining steps ran
    manifest = json.loads((killed / "out" / "sfn_manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["engine"]["steps"] == {"resumed_at": start, "run_in_this_process": 6 - start}
    a, b = load_tensors(reference / "out"), load_tensors(killed / "out")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


FAKE_SRUN = """#!/bin/bash
# srun for a test: starts the command once per node of the allocation, all on this machine
while [[ $1 == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@" > "$SRUN_LOGS/node$node.log" 2>&1 &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""


@pytest.mark.slow
def test_zero3_on_two_nodes_through_the_slurm_example(tmp_path, qwen2_base, sum_data):
    """ZeRO-3 on two one-process nodes, launched by ds_configs/slurm/multinode.sbatch itself (srun and scontrol
    replaced by stand-ins that start both "nodes" on this machine): every parameter partitioned across the two
    ranks, only o_proj changed, every other tensor bitwise the base, the output written once."""
    bin_dir, logs = tmp_path / "bin", tmp_path / "logs"
    bin_dir.mkdir()
    logs.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")  # `scontrol show hostnames`: the head node
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    recipe = train_recipe(tmp_path, qwen2_base, sum_data, per_device_train_batch_size=2,
                          deepspeed=str(REPO / "ds_configs" / "zero3.json"))
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_NNODES="2", SLURM_JOB_NODELIST="node[1-2]",
                    SLURM_JOB_ID="4242", GPUS_PER_NODE="1", RDZV_PORT=str(free_port()), PYTHON=sys.executable,
                    TRAIN_SCRIPT=str(OBSERVED), SRUN_LOGS=str(logs), SFN_OBSERVE_DIR=str(tmp_path / "observed"))
    run(["bash", str(REPO / "ds_configs" / "slurm" / "multinode.sbatch"), str(recipe)], env)
    node_logs = [(logs / f"node{n}.log").read_text() for n in (0, 1)]
    assert sum(log.count("saved checkpoint, plugin and manifest") for log in node_logs) == 1  # written once
    records = observed(tmp_path / "observed")
    assert len(records) == 2
    for name, param in records[0]["params"].items():
        shares = [r["params"][name]["local_numel"] for r in records]
        assert all(r["params"][name]["zero3_partitioned"] for r in records), name
        assert sum(shares) >= param["numel"] and max(shares) < param["numel"], name  # (ZeRO pads the last share)
    changed, unchanged = changed_tensors(qwen2_base, tmp_path / "out")
    assert changed == O_PROJ and len(unchanged) == 47
    manifest = json.loads((tmp_path / "out" / "sfn_manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["engine"]["in_effect"]["partitioned_params"] == 51


@pytest.mark.slow
def test_fsdp_dropped_fails_in_one_line(tmp_path, qwen2_base, sum_data):
    """What accelerate does alone on CPU -- drop the FSDP plugin and train as plain data parallel -- stops the run
    before its first step with one line naming the engine asked for and the one in effect."""
    recipe = train_recipe(tmp_path, qwen2_base, sum_data, **FSDP2)
    log = run([sys.executable, str(OBSERVED), "--drop-fsdp", "--config", str(recipe)], clean_env(), expect=2)
    # (the error line follows the Trainer's unfinished progress bar on stderr)
    lines = ["sfn train: error:" + line.split("sfn train: error:")[1] for line in log.replace("\r", "\n").splitlines()
             if "sfn train: error:" in line]
    assert lines == ["sfn train: error: recipe asks for fsdp2, but training runs as ddp (no parameter is a sharded "
                     "DTensor: the FSDP settings were dropped): stopped before the first step. Use the engine named, "
                     "or remove it from the recipe/launcher to train as it would."], log[-3000:]
    assert "Traceback" not in log
    assert json.loads((tmp_path / "out" / "sfn_manifest.json").read_text())["status"] == "running"
