"""Per-rank memory of each engine, from the simulated one-process step (`simulate.StepTrace`).

Simulated (taken row by row from the trace): activations, the loss/logits, the optimizer step's temporaries and, for one
process and DDP, every tensor. Computed analytically (from the parameter counts and the engine's documented buffers;
each result says which rows are analytic):

- DDP: one gradient bucket copy of the trained gradients (`gradient_as_bucket_view` off, PyTorch's default).
- ZeRO-2: full bf16 weights; fp32 gradient partition (1/N) plus two reduce buckets (`overlap_comm`); fp32 master
  weights and Adam moments partitioned (12 bytes per trained parameter / N); the step casts one fp32 partition.
- ZeRO-3: weights partitioned (1/N; parameters under `stage3_param_persistence_threshold` kept whole); while in use,
  the largest gathered unit plus the prefetch bucket, or the parameters kept gathered for reuse (up to
  stage3_max_live_parameters and stage3_max_reuse_distance), whichever is larger; gradients, optimizer as ZeRO-2.
- FSDP2 (`fully_shard` per decoder layer): every weight sharded (1/N), trained tensors as fp32 masters; the root unit
  (embeddings, head, final norm) stays gathered through forward and backward, two layer units gathered (in use and
  prefetched); one unit's unsharded gradients in bf16 plus their fp32 reduce copy; Adam moments 8 bytes / N.
- DeepSpeed CPU offload: optimizer state (and with `offload_param`, the weight partitions) leave the GPU.
"""

from __future__ import annotations

from .simulate import CATEGORIES

ENGINES = ("plain", "zero2", "zero3", "fsdp2")


def _row(trace, index) -> dict:
    return dict(zip(CATEGORIES, trace.series[index]))


def _max_dynamic(trace) -> tuple[int, dict]:
    """The row with the most simulated non-state memory (activations, loss/logits), which an engine adds to its
    model states."""
    best, best_row = -1, None
    for i, row in enumerate(trace.series):
        value = row[CATEGORIES.index("activations")] + row[CATEGORIES.index("loss_logits")]
        if value > best:
            best, best_row = value, i
    return best, _row(trace, best_row)


def per_rank(trace, engine: str, world: int, ds_config: dict | None = None, hidden_size: int = 0) -> dict:
    """{"peak": bytes, "breakdown": {...}, "analytic": [rows computed, not simulated], "cpu_offload_bytes": ...}"""
    if engine == "plain":
        return _plain(trace, world)
    zero = (ds_config or {}).get("zero_optimization", {})
    p = trace.params
    dyn, row = _max_dynamic(trace)
    step_peak = max(r[CATEGORIES.index("optimizer_step")] for r in trace.series) // world
    if engine in ("zero2", "zero3"):
        states, analytic, offload = _zero_states(p, engine, world, zero, hidden_size)
    elif engine == "fsdp2":
        states, analytic, offload = _fsdp2_states(p, world)
    else:
        raise ValueError(f"unknown engine {engine!r}; one of {', '.join(ENGINES)}")
    base = sum(states.values())
    during_step = base + max(step_peak, states.pop("_step_cast", 0))
    states.pop("_step_cast", None)
    breakdown = {**states, "activations": row["activations"], "loss_logits": row["loss_logits"]}
    peak = max(base + dyn, during_step)
    if during_step > base + dyn:
        breakdown.update(activations=0, loss_logits=0, optimizer_step=during_step - base)
    return {"peak": peak, "breakdown": breakdown, "analytic": analytic, "cpu_offload_bytes": offload}


def _plain(trace, world: int) -> dict:
    row = _row(trace, trace.peak_index)
    analytic = []
    if world > 1:
        bucket = 4 * trace.params["trained_numel"] if trace.params["trained_bytes"] else 0
        bucket = max(bucket, trace.params["trained_bytes"])
        row["ddp_buckets"] = bucket
        analytic.append("ddp_buckets: DDP's gradient buckets, one copy of the trained gradients")
    return {"peak": sum(row.values()), "breakdown": row, "analytic": analytic, "cpu_offload_bytes": 0}


def _auto(value, default):
    return default if value in (None, "auto") else int(float(value))


def _zero_states(p: dict, engine: str, world: int, zero: dict, hidden: int):
    n_t = p["trained_numel"]
    offload_opt = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    offload_par = (zero.get("offload_param") or {}).get("device", "none") not in ("none", None)
    bucket_elems = min(_auto(zero.get("reduce_bucket_size"), hidden * hidden or 5 * 10**8), max(n_t, 1))
    states = {}
    analytic = ["gradients: fp32 partition of the trained gradients (1/N) + 2 bf16 reduce buckets (overlap_comm)",
                "optimizer_state: fp32 master weights + Adam moments, 12 bytes per trained parameter / N"]
    if engine == "zero2":
        states["frozen_weights"] = p["frozen_bytes"]
        states["trained_weights"] = p["trained_bytes"]
    else:
        threshold = _auto(zero.get("stage3_param_persistence_threshold"), 10 * hidden)
        persistent = sum(b for n, b in p["small_numels"] if n < threshold)
        total = p["frozen_bytes"] + p["trained_bytes"]
        sharded = 0 if offload_par else (total - persistent) // world
        states["frozen_weights"] = sharded * p["frozen_bytes"] // max(total, 1) + persistent
        states["trained_weights"] = sharded * p["trained_bytes"] // max(total, 1)
        units = sorted([*p["layer_bytes"].values(), *(b for _, b in p["small_numels"])], reverse=True)
        prefetch = 2 * _auto(zero.get("stage3_prefetch_bucket_size"), int(0.9 * hidden * hidden))
        # parameters reused within stage3_max_reuse_distance stay gathered, up to stage3_max_live_parameters
        # (1e9 in ds_configs/zero3.json: a whole small model, ~2 GB of bf16 on a large one); measured on 2 CPU ranks
        numel = p["frozen_numel"] + p["trained_numel"]
        kept = min(_auto(zero.get("stage3_max_live_parameters"), 10**9),
                   _auto(zero.get("stage3_max_reuse_distance"), 10**9), numel) * total // max(numel, 1)
        states["gathered_weights"] = max(units[0] + min(prefetch, units[1] if len(units) > 1 else 0), kept)
        analytic.insert(0, "frozen/trained weights: 1/N partitions (+ parameters below the persistence threshold "
                        "whole); gathered_weights: the largest unit in use + the prefetch bucket, or the parameters "
                        "kept gathered for reuse (up to stage3_max_live_parameters), whichever is larger")
        if offload_par:
            analytic.insert(0, "offload_param: weight partitions held in CPU memory")
    states["gradients"] = 4 * n_t // world + 2 * 2 * bucket_elems
    states["optimizer_state"] = 0 if offload_opt else 12 * n_t // world
    states["_step_cast"] = 0 if offload_opt else 4 * n_t // world
    offload = (16 * n_t // world if offload_opt else 0) + (
        (p["frozen_bytes"] + p["trained_bytes"]) // world if offload_par else 0)
    if offload_opt:
        analytic.append("offload_optimizer: master weights, moments and the fp32 gradient copy in CPU memory "
                        "(cpu_offload_bytes)")
    return states, analytic, offload


def _fsdp2_states(p: dict, world: int):
    n_t = p["trained_numel"]
    layers = p["layer_bytes"] or {0: 0}
    layer_train = p["layer_trained_numel"] or {0: 0}
    root_trained = n_t - sum(layer_train.values())
    states = {
        "frozen_weights": p["frozen_bytes"] // world,
        "trained_weights": 4 * n_t // world,
        "gathered_weights": p["outside_layer_bytes"] + 2 * max(layers.values()),
        "gradients": 4 * n_t // world + 2 * root_trained + 6 * max(layer_train.values()),
        "optimizer_state": 8 * n_t // world,
    }
    analytic = ["frozen/trained weights: 1/N shards, trained as fp32 masters; gathered_weights: the root unit "
                "(embeddings, head, final norm) + two decoder-layer units in bf16",
                "gradients: fp32 shards (1/N) + the root's and one layer's unsharded bf16 gradients and fp32 reduce "
                "copy", "optimizer_state: Adam moments, 8 bytes per trained parameter / N"]
    return states, analytic, 0
