"""Delta: how much each module moved between two checkpoints (the paper's first stethoscope).

For every tensor present in both A (base) and B (e.g. the reasoning fine-tune):

- ||B - A||_F, ||A||_F and the relative change ||B - A||_F / ||A||_F, exact over all elements (float32 pieces,
  sums accumulated in float64);
- the element-wise relative change r = (B - A) / max(|A|, eps), with eps = EPS_REL * mean|A| of that tensor
  (floored at EPS_FLOOR; mean|A| over the sampled elements, see below). Why eps: weights that are exactly 0 in A (or
  tiny) would give infinities; 1e-6 of the tensor's own typical magnitude keeps such elements finite (and in the
  outermost bins) without touching any element of normal size.

Per role (q_proj, o_proj, ... via `roles.ROLE_PATTERNS`, first match wins, else "other") the r values of all layers go
into one histogram on fixed bins of t = sign(r) * log10(1 + |r| / LINTHRESH) (a symmetric log axis for the plots: r = 0
sits in the central bin, |r| from 1e-6 to 1e3 spread over +-9, beyond that clipped into the end bins).

Bimodality: Sarle's coefficient BC = (g1^2 + 1) / (g2 + 3(n-1)^2 / ((n-2)(n-3))) (g1 skewness, g2 excess kurtosis, from
streaming central moments; BC > 5/9 hints at two modes) is computed on q = log10(max(|r|, u)), where u is the unit
roundoff of the coarser of A's and B's dtypes (2^-24 for float32, 2^-8 for bfloat16): every real change of a stored
element is at least about u relative to it, so an untouched element (r = 0) sits at u, just below the smallest change
the dtype can hold. On q, "most weights untouched, a few moved" (or any two groups of change sizes decades apart)
gives two modes and BC near 1, while "every weight moved a little" gives one: Gaussian or Laplace weight changes of
Gaussian weights give BC ~0.2, a Gaussian r ~0.49, a Laplace r ~0.43. (A uniform r sits at the threshold itself:
log|U| is exponential, whose BC is exactly 5/9.) Why not t: the sign splits every distribution symmetric around
zero into two lobes, so BC(t) was ~0.95 for a plain Gaussian and told nothing.

Roles are matched on each tensor's in-memory name (`sfn_train.names`: a per-expert tensor on disk is part of the
fused `experts` tensor in memory). Routed experts are also reported one by one (`experts` in delta.json,
`delta_experts.csv`): each expert's change pooled over its tensors, whether the checkpoint stores one tensor per
expert (Qwen3-MoE, DeepSeek-V3, Mixtral) or all experts fused along dim 0 (GPT-OSS, Llama 4).

Histograms and moments use at most `sample` elements per tensor (uniform, seeded, with replacement) weighted by
numel/sample, so each tensor counts for its size; tensors up to `sample` elements use every element. Norms never
sample. Only one piece of one tensor of each model is in memory at a time, per worker: two tensors are processed
at once by threads (torch and file reads release the GIL), each with one torch thread.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, atomic_output_dir, check_output_dir
from ..errors import SfnError
from ..manifest import write_manifest
from ..names import NameMap
from ..roles import ROLE_PATTERNS, layer_index
from ..shards import CHUNK, FLOAT_DTYPES, iter_chunks, numel, one_thread, torch_threads
from ._io import seed_for

EPS_REL = 1e-6
EPS_FLOOR = 1e-12
LINTHRESH = 1e-6
T_MAX = 9.0  # ~ log10(1 + 1e3 / LINTHRESH)
N_BINS = 181  # odd: r = 0 is the centre of the middle bin
# Unit roundoff per stored dtype: one ulp of a value x is between u*|x| and 2u*|x|, so no real change is smaller than u.
UNIT_ROUNDOFF = {"F64": 2.0**-53, "F32": 2.0**-24, "F16": 2.0**-11, "BF16": 2.0**-8}
BIN_WIDTH = 2 * T_MAX / (N_BINS - 1)
EDGES = [-T_MAX - BIN_WIDTH / 2 + i * BIN_WIDTH for i in range(N_BINS + 1)]
SAMPLE = 1 << 16

_ROLE_RES = [(role, [re.compile(p) for p in pats]) for role, pats in ROLE_PATTERNS.items()]


def role_of(name: str) -> str:
    return next((role for role, pats in _ROLE_RES if any(p.search(name) for p in pats)), "other")


def symlog(r: torch.Tensor) -> torch.Tensor:
    return torch.sign(r) * torch.log10(1 + r.abs() / LINTHRESH)


def log_abs_change(r: torch.Tensor, floor: float) -> torch.Tensor:
    """q = log10(max(|r|, floor)): the variable whose bimodality is reported (unchanged elements sit at the floor)."""
    return torch.log10(r.abs().clamp_min(floor))


@dataclass
class Moments:
    """Weighted streaming central moments (Pebay's pairwise update): exact merging of pieces, no cancellation."""

    n: float = 0.0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    m4: float = 0.0

    @classmethod
    def of(cls, x: torch.Tensor, weight: float = 1.0) -> "Moments":
        """Moments of the values `x`, each standing for `weight` elements."""
        if x.numel() == 0:
            return cls()
        x = x.double()
        mean = float(x.mean())
        c = x - mean
        c2 = c * c
        return cls(x.numel() * weight, mean, *(weight * float(v) for v in (c2.sum(), (c2 * c).sum(), (c2 * c2).sum())))

    def add(self, x: torch.Tensor, weight: float = 1.0) -> None:
        self.merge(Moments.of(x, weight))

    def merge(self, other: "Moments") -> None:
        if other.n == 0:
            return
        na, ma, m2a, m3a = self.n, self.mean, self.m2, self.m3
        nb, mb, m2b, m3b, m4b = other.n, other.mean, other.m2, other.m3, other.m4
        n = na + nb
        delta = mb - ma
        self.m4 += m4b + (
            delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
            + 6 * delta**2 * (na * na * m2b + nb * nb * m2a) / n**2
            + 4 * delta * (na * m3b - nb * m3a) / n
        )
        self.m3 += m3b + delta**3 * na * nb * (na - nb) / n**2 + 3 * delta * (na * m2b - nb * m2a) / n
        self.m2 += m2b + delta**2 * na * nb / n
        self.mean = ma + delta * nb / n
        self.n = n

    def summary(self) -> dict:
        n = self.n
        if n < 4 or self.m2 <= 0:
            return {"n": n, "mean": self.mean, "std": math.sqrt(self.m2 / n) if n else 0.0,
                    "skewness": None, "excess_kurtosis": None, "bimodality_coefficient": None}
        g1 = math.sqrt(n) * self.m3 / self.m2**1.5
        g2 = n * self.m4 / self.m2**2 - 3
        bc = (g1 * g1 + 1) / (g2 + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))
        return {"n": n, "mean": self.mean, "std": math.sqrt(self.m2 / n), "skewness": g1,
                "excess_kurtosis": g2, "bimodality_coefficient": bc}


@dataclass
class RoleStats:
    hist: torch.Tensor = field(default_factory=lambda: torch.zeros(N_BINS, dtype=torch.float64))
    moments: Moments = field(default_factory=Moments)
    layers: dict = field(default_factory=dict)  # layer (or None) -> [sum dd, sum aa]


def tensor_delta(a_info, b_info, sample: int = SAMPLE, seed: int = 0, role: str | None = None,
                 slices: int = 1) -> tuple[dict, torch.Tensor, Moments]:
    """(row of exact numbers, histogram of t, moments of q = log10|r|) for one tensor pair.

    `slices` > 1 also sums ||B - A||^2 and ||A||^2 over each of that many equal slices along dim 0 (the experts of a
    fused expert tensor), as `row["slice_sums"]`.
    """
    n = numel(a_info)
    k = min(n, sample)
    gen = torch.Generator().manual_seed(seed_for(a_info.name, seed))
    dd = aa = 0.0
    picks_a, picks_d = [], []
    pos = 0
    slice_len = n // slices if slices > 1 else 0
    slice_sums = [[0.0, 0.0] for _ in range(slices)] if slice_len else None
    d_buf = torch.empty(min(n, CHUNK))  # reused like iter_chunks' buffers: no page faults per piece
    for a, b in zip(iter_chunks(a_info), iter_chunks(b_info)):
        d = torch.sub(b, a, out=d_buf[: a.numel()])
        dd += float(torch.dot(d, d))
        aa += float(torch.dot(a, a))
        if slice_sums is not None:
            start = 0
            while start < a.numel():  # the piece split where one expert's elements end and the next one's begin
                index = (pos + start) // slice_len
                stop = min(a.numel(), (index + 1) * slice_len - pos)
                slice_sums[index][0] += float(torch.dot(d[start:stop], d[start:stop]))
                slice_sums[index][1] += float(torch.dot(a[start:stop], a[start:stop]))
                start = stop
        if k == n:
            picks_a.append(a.clone())
            picks_d.append(d.clone())
        else:
            m = round(k * (pos + a.numel()) / n) - round(k * pos / n)
            idx = torch.randint(a.numel(), (m,), generator=gen)
            picks_a.append(a[idx])
            picks_d.append(d[idx])
        pos += a.numel()
    a_s, d_s = (torch.cat(p) if p else torch.zeros(0) for p in (picks_a, picks_d))
    eps = max(EPS_REL * float(a_s.abs().double().mean()) if a_s.numel() else 0.0, EPS_FLOOR)
    r = d_s / a_s.abs().clamp_min(eps)
    t = symlog(r)
    q = log_abs_change(r, max(UNIT_ROUNDOFF[a_info.dtype], UNIT_ROUNDOFF[b_info.dtype]))
    l2_diff, l2_base = math.sqrt(dd), math.sqrt(aa)
    row = {
        "name": a_info.name,
        "role": role or role_of(a_info.name),
        "layer": layer_index(a_info.name),
        "dtype": a_info.dtype if a_info.dtype == b_info.dtype else f"{a_info.dtype}/{b_info.dtype}",
        "shape": list(a_info.shape),
        "numel": n,
        "l2_base": l2_base,
        "l2_diff": l2_diff,
        "rel_change": l2_diff / l2_base if l2_base > 0 else (0.0 if l2_diff == 0 else math.inf),
        "eps": eps,
    }
    if slice_sums is not None:
        row["slice_sums"] = slice_sums
    weight = n / t.numel() if t.numel() else 0.0
    hist = torch.histc(t.double().clamp(EDGES[0], EDGES[-1]), N_BINS, EDGES[0], EDGES[-1]) * weight
    return row, hist, Moments.of(q, weight)


def _finite(x):
    return x if isinstance(x, (int, str)) or x is None or math.isfinite(x) else None


@one_thread
def delta(
    a: str | os.PathLike,
    b: str | os.PathLike,
    out: str | os.PathLike,
    *,
    sample: int = SAMPLE,
    seed: int = 0,
    plots: bool = True,
    overwrite: bool = False,
    quiet: bool = False,
    workers: int = 2,
) -> dict:
    """Compare A and B tensor by tensor; write delta.json, delta.csv and PNGs into `out`; return the JSON dict.

    `workers` tensors are compared at once (threads); results are gathered in a fixed order, so the output does not
    depend on it.
    """
    ck_a, ck_b = Checkpoint(a), Checkpoint(b)
    check_output_dir(out, overwrite)
    if sample < 1:
        raise SfnError(f"--sample {sample} must be at least 1 (elements per tensor for the histograms).")
    pairs, mismatched, skipped_dtype = _comparable(ck_a, ck_b)
    rows, roles, experts = _compare(ck_a, ck_b, pairs, sample, seed, workers)
    summary = _role_summary(rows, roles)
    ranking = sorted(summary, key=lambda r: -(summary[r]["mean_rel_change"] or 0.0))
    result = {
        "settings": _settings(ck_a, ck_b, sample, seed),
        "ranking": ranking,
        "roles": summary,
        # Each routed expert on its own, pooled over its tensors (gate, up, down, biases): sqrt(sum ||B-A||^2 /
        # sum ||A||^2). The role `experts` above pools all of them.
        "experts": [{"layer": layer, "expert": e, "numel": int(k), "l2_base": math.sqrt(aa), "l2_diff": math.sqrt(dd),
                     "rel_change": math.sqrt(dd / aa) if aa > 0 else None}
                    for (layer, e), (dd, aa, k) in sorted(experts.items(), key=lambda kv: (-1 if kv[0][0] is None else kv[0][0], kv[0][1]))],
        "tensors": [{k: _finite(v) if not isinstance(v, list) else v for k, v in r.items()} for r in rows],
        "only_in_a": [n for n in ck_a.names if n not in ck_b.tensors],
        "only_in_b": [n for n in ck_b.names if n not in ck_a.tensors],
        "skipped_shape_mismatch": mismatched,
        "skipped_not_float": skipped_dtype,
    }
    with atomic_output_dir(out, overwrite) as tmp:
        write_manifest(tmp, "delta", a={"path": str(ck_a.path)}, b={"path": str(ck_b.path)}, sample=sample, seed=seed)
        (tmp / "delta.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        _write_csv(tmp / "delta.csv", rows)
        if result["experts"]:
            _write_experts_csv(tmp / "delta_experts.csv", result["experts"])
        if plots:
            _plot(tmp, summary, ranking)
    if not quiet:
        print(format_table(summary, ranking))
    return result


def _comparable(ck_a: Checkpoint, ck_b: Checkpoint) -> tuple[list[str], list[str], list[str]]:
    """(the tensors both hold with one shape and float dtypes, in A's file order; those whose shapes differ; those
    not float)."""
    common = [n for n in ck_a.names if n in ck_b.tensors]
    mismatched = [n for n in common if ck_a.tensors[n].shape != ck_b.tensors[n].shape]
    skipped_dtype = [n for n in common if {ck_a.tensors[n].dtype, ck_b.tensors[n].dtype} - FLOAT_DTYPES]
    pairs = [n for n in common if n not in set(mismatched) | set(skipped_dtype)]
    if not pairs:
        raise SfnError(
            f"{ck_a.path} and {ck_b.path} share no tensor of the same shape: compare two checkpoints of one model."
        )
    # Read in A's file order: each shard of A is then read front to back.
    pairs.sort(key=lambda n: (str(ck_a.tensors[n].file), ck_a.tensors[n].start))
    return pairs, mismatched, skipped_dtype


def _compare(ck_a: Checkpoint, ck_b: Checkpoint, pairs: list[str], sample: int, seed: int, workers: int):
    """(a row per tensor, RoleStats per role, {(layer, expert): [sum dd, sum aa, numel]}), `workers` at a time."""
    from tqdm.auto import tqdm

    # Roles are read from the in-memory names (the trainer's), so a per-expert tensor on disk counts as `experts`.
    names = NameMap.for_checkpoint(ck_a)
    role = {n: role_of(names.memory_name(n)) for n in pairs}
    slices = {n: _fused_experts(n, ck_a.tensors[n].shape) if role[n] == "experts" else 1 for n in pairs}

    rows, roles = [], {}
    experts: dict[tuple, list[float]] = {}  # (layer, expert) -> [sum dd, sum aa, numel]
    total = sum(ck_a.tensors[n].nbytes + ck_b.tensors[n].nbytes for n in pairs)

    def one(name):
        with torch_threads(1):
            return tensor_delta(ck_a.tensors[name], ck_b.tensors[name], sample, seed, role[name], slices[name])

    with tqdm(total=total, unit="B", unit_scale=True, desc="delta", disable=None) as bar, \
            ThreadPoolExecutor(workers) as pool:
        for name, (row, hist, moments) in zip(pairs, pool.map(one, pairs)):
            _add_experts(experts, name, row)
            rows.append(row)
            stats = roles.setdefault(row["role"], RoleStats())
            stats.hist += hist
            stats.moments.merge(moments)
            sums = stats.layers.setdefault(row["layer"], [0.0, 0.0])
            sums[0] += row["l2_diff"] ** 2
            sums[1] += row["l2_base"] ** 2
            bar.update(ck_a.tensors[name].nbytes + ck_b.tensors[name].nbytes)
    return rows, roles, experts


def _role_summary(rows: list[dict], roles: dict) -> dict:
    """Per role: tensor and element counts, mean and pooled changes, the change per layer, the moments and histogram
    of log10|r|."""
    summary = {}
    for role, stats in roles.items():
        per_layer = {
            layer: {"l2_diff": math.sqrt(dd), "rel_change": math.sqrt(dd / aa) if aa > 0 else None}
            for layer, (dd, aa) in sorted(stats.layers.items(), key=lambda kv: -1 if kv[0] is None else kv[0])
        }
        rels = [v["rel_change"] for v in per_layer.values() if v["rel_change"] is not None]
        dd_all = sum(s[0] for s in stats.layers.values())
        aa_all = sum(s[1] for s in stats.layers.values())
        role_rows = [r for r in rows if r["role"] == role]
        summary[role] = {
            "n_tensors": len(role_rows),
            "numel": sum(r["numel"] for r in role_rows),
            "mean_l2_diff": sum(v["l2_diff"] for v in per_layer.values()) / len(per_layer),
            "mean_rel_change": sum(rels) / len(rels) if rels else None,
            "pooled_rel_change": math.sqrt(dd_all / aa_all) if aa_all > 0 else None,
            "per_layer": {("none" if k is None else str(k)): v for k, v in per_layer.items()},
            "moments_of_log10_abs_r": stats.moments.summary(),
            "histogram_counts": stats.hist.tolist(),
        }
    return summary


def _settings(ck_a: Checkpoint, ck_b: Checkpoint, sample: int, seed: int) -> dict:
    """What delta.json's numbers mean, with the constants and settings that made them."""
    return {
        "a": str(ck_a.path),
        "b": str(ck_b.path),
        "relative_change_elementwise": "r = (B - A) / max(|A|, eps), eps = EPS_REL * mean|A| of the tensor "
        "(over its sampled elements), at least EPS_FLOOR",
        "EPS_REL": EPS_REL,
        "EPS_FLOOR": EPS_FLOOR,
        "histogram_variable": "t = sign(r) * log10(1 + |r| / LINTHRESH), clipped to the outer bin edges",
        "LINTHRESH": LINTHRESH,
        "bin_edges_t": EDGES,
        "sample_per_tensor": sample,
        "sampling": "uniform with replacement, seeded by (seed, name); weight numel/sample; all elements when "
        "numel <= sample; norms always use every element",
        "seed": seed,
        "bimodality": "Sarle's BC = (g1^2 + 1) / (g2 + 3(n-1)^2/((n-2)(n-3))) of q = log10(max(|r|, u)), u = unit "
        "roundoff of the coarser dtype of A and B (an unchanged element sits at u); > 5/9 suggests two groups of "
        "elements, e.g. untouched and moved",
        "UNIT_ROUNDOFF": UNIT_ROUNDOFF,
    }


_EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")


def _fused_experts(name: str, shape) -> int:
    """How many experts a tensor holds along dim 0: 1 when stored one per expert (`experts.3.w1.weight`)."""
    return 1 if _EXPERT_INDEX.search(name) or len(shape) < 2 else int(shape[0])


def _add_experts(experts: dict, name: str, row: dict) -> None:
    """Add the tensor's sums to its expert's (or, fused, each slice's to its expert's)."""
    if row["role"] != "experts":
        return
    sums = row.pop("slice_sums", None)
    if sums is None:
        match = _EXPERT_INDEX.search(name)
        if match is None:  # a 1-D tensor of one expert block: not attributable to one expert
            return
        sums = {int(match.group(1)): [row["l2_diff"] ** 2, row["l2_base"] ** 2]}
        per = row["numel"]
    else:
        sums = dict(enumerate(sums))
        per = row["numel"] // len(sums)
    for e, (dd, aa) in sums.items():
        acc = experts.setdefault((row["layer"], e), [0.0, 0.0, 0])
        acc[0] += dd
        acc[1] += aa
        acc[2] += per


def _write_experts_csv(path: Path, experts: list[dict]) -> None:
    fields = ["layer", "expert", "numel", "l2_base", "l2_diff", "rel_change"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(experts)


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = ["name", "role", "layer", "dtype", "shape", "numel", "l2_base", "l2_diff", "rel_change", "eps"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "shape": "x".join(map(str, r["shape"])), "layer": "" if r["layer"] is None else r["layer"]})


def format_table(summary: dict, ranking: list[str]) -> str:
    def fmt(x, spec):
        return format(x, spec) if x is not None else "-".rjust(int(spec.split(".")[0]))

    lines = [f"{'role':<14}{'tensors':>8}{'mean |dW|':>12}{'mean rel':>12}{'pooled rel':>12}{'BC(log|r|)':>12}"]
    for role in ranking:
        s = summary[role]
        bc = s["moments_of_log10_abs_r"]["bimodality_coefficient"]
        lines.append(
            f"{role:<14}{s['n_tensors']:>8}{fmt(s['mean_l2_diff'], '12.4g')}{fmt(s['mean_rel_change'], '12.4g')}"
            f"{fmt(s['pooled_rel_change'], '12.4g')}{fmt(bc, '12.3f')}"
        )
    return "\n".join(lines)


def _plot(out: Path, summary: dict, ranking: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(ranking, [summary[r]["mean_l2_diff"] for r in ranking], color="tab:blue")
    axes[0].set_title("||B - A||_F, mean over layers")
    axes[1].bar(ranking, [summary[r]["mean_rel_change"] or 0 for r in ranking], color="tab:orange")
    axes[1].set_title("||B - A|| / ||A||, mean over layers")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out / "delta_l2_by_role.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for role in ranking:
        layers = [(int(k), v["rel_change"]) for k, v in summary[role]["per_layer"].items() if k != "none"]
        if layers:
            ax.plot(*zip(*layers), marker=".", label=role)
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # layers are whole numbers
    ax.set_ylabel("||B - A|| / ||A||")
    ax.set_title("relative change per layer")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(out / "delta_rel_by_layer.png", dpi=100, bbox_inches="tight")
    plt.close(fig)

    cols = min(4, len(ranking))
    rows = math.ceil(len(ranking) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    centers = [(EDGES[i] + EDGES[i + 1]) / 2 for i in range(N_BINS)]
    ticks = [-T_MAX, -6, -2, 0, 2, 6, T_MAX]
    labels = ["-1e3", "-1", "-1e-4", "0", "1e-4", "1", "1e3"]
    for ax, role in zip(axes.flat, ranking):
        ax.bar(centers, summary[role]["histogram_counts"], width=BIN_WIDTH, color="tab:green")
        ax.set_yscale("log")
        ax.set_xticks(ticks, labels, fontsize=7)
        bc = summary[role]["moments_of_log10_abs_r"]["bimodality_coefficient"]
        ax.set_title(f"{role} (BC of log|r| {'-' if bc is None else f'{bc:.2f}'})", fontsize=9)
    for ax in list(axes.flat)[len(ranking):]:
        ax.axis("off")
    fig.suptitle("element-wise (B - A) / max(|A|, eps), symmetric log axis", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "delta_hist_by_role.png", dpi=100)
    plt.close(fig)
