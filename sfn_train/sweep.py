"""`sfn sweep`: one recipe over a grid of settings, each point its own `sfn train` run, ranked on a validation split.

    sfn sweep --config recipes/lab/oproj.yaml --grid learning_rate=1e-3,3e-3,1e-2 --out sweeps/oproj
    sfn sweep --config R --grid learning_rate=1e-4,3e-4 --grid trainable_modules=o_proj,all --out DIR --max_steps 200
    sfn sweep --config R --grid learning_rate=1e-4,3e-4 --out DIR --plan    # launch commands + DIR/sweep_array.sbatch
    sfn sweep --collect DIR                                                # table, JSON and plot of what has finished
    sfn sweep --config R --grid learning_rate=1e-4,3e-4 --seeds 42,43,44 --out DIR   # each point on 3 training seeds

The grid is the product of the `--grid` options; any other `--key value` is a recipe flag given to every point.

Why each point is its own `sfn train` process in its own folder (`DIR/points/<name>`): a point is then exactly the
command a user would run by hand (`--plan` prints it), its memory and failures are its own, and a finished point is
recognised by its manifest (status complete, launched with the same arguments), so an interrupted sweep restarts
where it stopped and a grid can be extended without redoing the points it already has.

Why a validation split and never the test task: picking the learning rate on the test task leaks the test into the
choice of model. The recipe declares the split (`validation_fraction`, or TRL's `eval_strategy` with the dataset's
`dataset_test_split`); every run evaluates it when training ends and its manifest records `eval_loss` and
`eval_mean_token_accuracy`.

A variant is one combination of the grid keys other than `learning_rate`. The best point of each variant -- lowest
`--metric` (default eval_loss), or highest for a metric whose name does not end in "loss", as TrainingArguments'
`greater_is_better` -- is marked `best` in `DIR/sweep.json` and `DIR/sweep.md`, and `DIR/sweep.png` plots the metric
against the learning rate, one line per variant. Each finished point folder gets `sfn_sweep.json` (what it was
compared with and whether it won), which `sfn compare` reads to say how a model's learning rate was chosen.

Seeds (`--seeds 42,43,44`): each grid point is trained once per seed (`--seed S`, which sets the data order and the
initialisation of anything initialised; each run's manifest records it), in `DIR/points/<point>__seed-S`. A point's
metric is the mean over its seeds, shown with their standard deviation and range; the best point of a variant is
chosen on that mean, among the points whose every seed finished. A rerun trains only the (point, seed) runs not
finished, so adding a seed trains only that seed.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .arguments import ArgumentParser
from .errors import SfnError
from .manifest import MANIFEST_FILE, read_json, write_json
from .stages import clock
from .subprocess_run import run_command

SWEEP_FILE = "sweep.json"
POINT_RECORD = "sfn_sweep.json"  # written into each finished point folder
LR = "learning_rate"
# Keys the sweep sets itself: one folder per point, which it may overwrite when it reruns an unfinished point
RESERVED = ("output_dir", "overwrite_output_dir", "config")
FORMAT = "sfn-sweep/1"


# ---------------------------------------------------------------------------------------------------------------
# Grid


@dataclass(frozen=True)
class Point:
    settings: tuple[tuple[str, str], ...]  # (grid key, value as given), in --grid order
    seed: int | None = None  # the training seed of this run of the point (--seeds), else the recipe's

    @property
    def point(self) -> str:
        """The grid point's name: `learning_rate-0.001__trainable_modules-o_proj` (shell-safe)."""
        return "__".join(f"{key}-{_slug(value)}" for key, value in self.settings)

    @property
    def name(self) -> str:
        """Folder name: the point's, with `__seed-S` for a run of a seeded sweep."""
        return self.point + ("" if self.seed is None else f"__seed-{self.seed}")

    @property
    def label(self) -> str:
        return " ".join([f"{key}={value}" for key, value in self.settings]
                        + ([] if self.seed is None else [f"seed={self.seed}"]))

    def variant(self) -> str:
        """The point's settings other than the learning rate ('' when the grid has only learning rates)."""
        return " ".join(f"{key}={value}" for key, value in self.settings if key != LR)

    def flags(self) -> list[str]:
        # A value of several words is a list-valued key: `--grid "trainable_modules=o_proj,q_proj k_proj"`
        seed = [] if self.seed is None else ["--seed", str(self.seed)]
        return [token for key, value in self.settings for token in (f"--{key}", *value.split())] + seed


def _slug(value: str) -> str:
    return "".join(c if c.isalnum() or c in ".-+" else "_" for c in value.strip())


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """`["learning_rate=1e-4,3e-4", "trainable_modules=o_proj,all"]` -> {key: [values]} (order kept)."""
    if not specs:
        raise SfnError("no --grid given: pass at least one, e.g. --grid learning_rate=1e-4,3e-4,1e-3.")
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise SfnError(f"--grid {spec!r} must be KEY=V1,V2,... (e.g. --grid learning_rate=1e-4,3e-4).")
        if key in RESERVED:
            raise SfnError(f"--grid {key}: the sweep sets {key} itself (one folder per point); grid other keys.")
        if key in grid:
            raise SfnError(f"--grid {key} is given twice: list all its values in one --grid {key}=V1,V2,...")
        items = [v.strip() for v in values.split(",")]
        if any(not v for v in items):
            raise SfnError(f"--grid {key}={values!r} has an empty value: separate values by single commas.")
        if len(set(items)) != len(items):
            raise SfnError(f"--grid {key}={values!r} repeats a value: list each value once.")
        if key == LR:
            for v in items:
                try:
                    float(v)
                except ValueError:
                    raise SfnError(f"--grid learning_rate value {v!r} is not a number (e.g. 3e-4).") from None
        grid[key] = items
    return grid


def parse_seeds(spec: str | None) -> list[int] | None:
    """`--seeds 42,43,44` -> [42, 43, 44] (None when not given)."""
    if spec is None:
        return None
    try:
        seeds = [int(v) for v in spec.split(",")]
    except ValueError:
        raise SfnError(f"--seeds {spec!r} must be whole numbers separated by commas, e.g. --seeds 42,43,44.") from None
    if len(set(seeds)) != len(seeds):
        raise SfnError(f"--seeds {spec!r} repeats a seed: list each seed once.")
    return seeds


def grid_points(grid: dict[str, list[str]], seeds: list[int] | None = None) -> list[Point]:
    """The product of the grid, first key slowest, each point once per seed (seeds fastest); point names must stay
    distinct after slugging."""
    points = [Point(tuple(zip(grid, values)), seed) for values in itertools.product(*grid.values())
              for seed in (seeds or [None])]
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise SfnError(f"two grid points share the folder name {twice!r}: make the values differ in letters or digits.")
    return points


def point_lr(point: Point) -> float | None:
    value = dict(point.settings).get(LR)
    return None if value is None else float(value)


# ---------------------------------------------------------------------------------------------------------------
# Commands


def train_launcher(launcher: str | None) -> list[str]:
    """`sfn train` of this installation (absolute path, so that the command runs from any shell), or the user's."""
    if launcher:
        return shlex.split(launcher)
    script = Path(sys.executable).parent / "sfn"
    return [str(script), "train"] if script.exists() else [sys.executable, "-m", "sfn_train.cli", "train"]


def train_args(config: str, extra: list[str], point: Point, out: Path) -> list[str]:
    """The arguments after the launcher; also what a finished point's manifest must show it was launched with."""
    return ["--config", str(config), *extra, *point.flags(), "--output_dir", str(out / "points" / point.name),
            "--overwrite_output_dir", "true"]


def _launched_args(manifest: dict) -> list[str] | None:
    """The arguments from `--config` on of the command line the manifest records (shell-quoted, one string)."""
    command = manifest.get("command") or ""
    words = shlex.split(command) if isinstance(command, str) else list(command)
    return words[words.index("--config"):] if "--config" in words else None


def _check_extra(extra: list[str], grid: dict, seeds: list[int] | None = None) -> None:
    if seeds is not None and "seed" in grid:
        raise SfnError("--seeds and --grid seed=... both set the seed: give the seeds in --seeds only.")
    for token in extra:
        if token.startswith("--"):
            key = token[2:].split("=", 1)[0]
            if seeds is not None and key == "seed":
                raise SfnError("--seed and --seeds both set the seed: give the seeds in --seeds only.")
            if key in grid:
                raise SfnError(f"--{key} is both a grid key and a flag for every point: give it in one place.")
            if key in RESERVED:
                raise SfnError(f"--{key}: the sweep sets {key} itself (one folder per point under --out).")


def check_points(config: str, extra: list[str], points: list[Point], out: Path) -> None:
    """Parse every point's recipe + flags now, so a bad key or value fails before hours of training, and insist on
    a validation split."""
    from .config import parse_recipe

    for point in points:
        try:
            script_args, training_args, _, sfn_args = parse_recipe(train_args(config, extra, point, out))
        except SfnError as exc:
            raise SfnError(f"sweep point {point.label}: {exc}") from None
        if sfn_args.validation_fraction <= 0 and str(training_args.eval_strategy) in ("no", "IntervalStrategy.NO"):
            raise SfnError(f"recipe {config} declares no validation split, and a sweep must rank its points on one "
                           "(never on the test task): add `validation_fraction: 0.1` (rows held out of the training "
                           "data), or set eval_strategy with a dataset that has a `dataset_test_split` split.")


# ---------------------------------------------------------------------------------------------------------------
# State on disk


def _sha(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def plan_record(config: str, extra: list[str], grid: dict, points: list[Point], out: Path, metric: str,
                launcher: list[str]) -> dict:
    return {
        "format": FORMAT,
        "recipe": str(config),
        "recipe_sha256": _sha(config),
        "flags": extra,
        "grid": grid,
        "metric": metric,
        "greater_is_better": greater_is_better(metric),
        "seeds": sorted({p.seed for p in points}) if points and points[0].seed is not None else None,
        "points": [{"name": p.name, "point": p.point, "seed": p.seed, "settings": dict(p.settings), "variant": p.variant(),
                    "command": shlex.join([*launcher, *train_args(config, extra, p, out)])} for p in points],
    }


def _start(config: str, extra: list[str], grid: dict, points: list[Point], out: Path, metric: str,
           launcher: list[str]) -> dict:
    """Write DIR/sweep.json, refusing a folder that holds a sweep of another recipe or other flags."""
    out.mkdir(parents=True, exist_ok=True)
    record = plan_record(config, extra, grid, points, out, metric, launcher)
    old = read_json(out / SWEEP_FILE)
    if old is not None:
        if old.get("format") != FORMAT:
            raise SfnError(f"{out / SWEEP_FILE} was not written by `sfn sweep`; choose another --out.")
        changed = [what for what, key in (("recipe file", "recipe_sha256"), ("flags", "flags"))
                   if old.get(key) != record[key]]
        if changed:
            raise SfnError(f"{out} holds a sweep made with other {' and '.join(changed)}: use another --out, or "
                           "delete that folder to start over.")
    write_json(out / SWEEP_FILE, record)
    return record


def finished_manifest(out: Path, entry: dict) -> dict | None:
    """The point's manifest if its run completed with exactly the arguments this sweep gives it, else None."""
    manifest = read_json(out / "points" / entry["name"] / MANIFEST_FILE)
    if not manifest or manifest.get("status") != "complete":
        return None
    expected = shlex.split(entry["command"])
    if _launched_args(manifest) != expected[expected.index("--config"):]:
        return None
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# Run


def _prepare(config: str, grid_specs: list[str], out: Path, extra: list[str], metric: str,
             launcher: str | None, seeds: list[int] | None = None) -> tuple[list, dict]:
    """(grid points, the sweep record in DIR/sweep.json) after checking the grid, the recipe and every point."""
    grid = parse_grid(grid_specs)
    _check_extra(extra, grid, seeds)
    points = grid_points(grid, seeds)
    if not Path(config).is_file():
        raise SfnError(f"recipe {config} does not exist: pass --config PATH.yaml.")
    check_points(config, extra, points, out)
    return points, _start(config, extra, grid, points, out, metric, train_launcher(launcher))


def run_sweep(config: str, grid_specs: list[str], out: str | os.PathLike, extra: list[str] | None = None, *,
              metric: str = "eval_loss", launcher: str | None = None, env: dict | None = None, log=print,
              seeds: list[int] | None = None) -> dict:
    """Train every point (once per seed of `seeds`) not finished yet, one after another, then `collect`; returns
    what `collect` returns."""
    out, extra = Path(out), list(extra or [])
    points, record = _prepare(config, grid_specs, out, extra, metric, launcher, seeds)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)

    todo = [e for e in record["points"] if finished_manifest(out, e) is None]
    log(f"[sweep] {len(points)} points in {out}: {len(points) - len(todo)} finished before, {len(todo)} to train")
    started, durations = time.monotonic(), []
    for i, entry in enumerate(record["points"], 1):
        label = " ".join([f"{k}={v}" for k, v in entry["settings"].items()]
                         + ([f"seed={entry['seed']}"] if entry.get("seed") is not None else []))
        if entry not in todo:
            log(f"[sweep] {i}/{len(points)} {label}: finished before, skipped")
            continue
        left = len(todo) - len(durations) - 1
        eta = f", about {clock(left * sum(durations) / len(durations))} after this" if durations and left else ""
        log(f"[sweep] {i}/{len(points)} {label}: training ({left} left after this, elapsed "
            f"{clock(time.monotonic() - started)}{eta}); log {logs / (entry['name'] + '.log')}")
        run = run_command(shlex.split(entry["command"]), env=env, log_file=logs / f"{entry['name']}.log")
        code = run.exit_code  # the point's own peak memory and time, next to its log
        write_json(logs / f"{entry['name']}.json", run.stats())
        if code != 0:
            raise SfnError(f"sweep point {label} failed (exit {code}); see {logs / (entry['name'] + '.log')}. "
                           "Rerunning the same command keeps the finished points.")
        durations.append(run.wall_s)
        manifest = finished_manifest(out, entry)
        value = (manifest or {}).get("metrics", {}).get(metric)
        log(f"[sweep] {i}/{len(points)} {label}: {metric} {_fmt(value)} in {durations[-1]:.0f} s")
    result = collect(out, metric)
    log(f"[sweep] done in {clock(time.monotonic() - started)}: {result['markdown']}")
    return result


def plan_sweep(config: str, grid_specs: list[str], out: str | os.PathLike, extra: list[str] | None = None, *,
               metric: str = "eval_loss", launcher: str | None = None, sbatch_options: list[str] | None = None,
               seeds: list[int] | None = None) -> dict:
    """Write DIR/sweep.json and DIR/sweep_array.sbatch; return {"commands", "sbatch"} (nothing is trained)."""
    out, extra = Path(out), list(extra or [])
    points, record = _prepare(config, grid_specs, out, extra, metric, launcher, seeds)
    (out / "logs").mkdir(exist_ok=True)
    commands = [e["command"] for e in record["points"]]
    lines = [
        "#!/bin/bash",
        f"# `sfn sweep --plan`: one array task per point of the sweep in {out}.",
        f"# Submit: sbatch {out / 'sweep_array.sbatch'}   then, when all have finished: sfn sweep --collect {out}",
        "#SBATCH --job-name=sfn-sweep",
        f"#SBATCH --array=0-{len(commands) - 1}",
        f"#SBATCH --output={(out / 'logs').resolve()}/point-%a.log",
        *[f"#SBATCH {opt}" for opt in sbatch_options or []],
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        "COMMANDS=(",
        *[f"  {shlex.quote(c)}" for c in commands],
        ")",
        'eval "${COMMANDS[$SLURM_ARRAY_TASK_ID]}"',
        "",
    ]
    sbatch = out / "sweep_array.sbatch"
    sbatch.write_text("\n".join(lines), encoding="utf-8")
    sbatch.chmod(0o755)
    return {"commands": commands, "sbatch": sbatch}


def memory_lines(planned: dict, launcher: str | None, nproc: int | None, gpu_memory_gib: float | None) -> str:
    """`--plan`: each point's predicted peak memory per GPU (`sfn memory`; points that differ only in keys that
    change no memory, such as the learning rate, share one prediction)."""
    from .memory.plan import plan_line

    words = shlex.split(launcher or "")
    for flag in ("--nproc_per_node", "--num_processes"):
        if nproc is None and flag in words[:-1]:
            nproc = int(words[words.index(flag) + 1])
    cache, lines = {}, []
    for command in planned["commands"]:
        args = shlex.split(command)
        args = args[args.index("--config"):]
        lines.append(f"# {Path(args[args.index('--output_dir') + 1]).name}: "
                     + plan_line(args, nproc or 1, 1, gpu_memory_gib, cache))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Collect: table, JSON, plot


def greater_is_better(metric: str) -> bool:
    return not metric.endswith("loss")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _fmt(value, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if _finite(value) else "—"


def choose_best(rows: list[dict], metric: str) -> dict[str, dict]:
    """variant -> its best finished row (lowest metric, or highest when greater is better); NaN never wins."""
    sign = -1 if greater_is_better(metric) else 1
    best: dict[str, dict] = {}
    for row in rows:
        value = row.get(metric)
        if not _finite(value):
            continue
        current = best.get(row["variant"])
        if current is None or sign * value < sign * current[metric]:
            best[row["variant"]] = row
    return best


def collect(out: str | os.PathLike, metric: str | None = None) -> dict:
    """Read every point's manifest, choose the best point per variant, write sweep.json/sweep.md/sweep.png and each
    finished point's `sfn_sweep.json`. Points without a result are listed as missing. In a seeded sweep a point's
    metric is the mean over its seeds (`seed_points`), and the choice is made on those means."""
    out = Path(out)
    record = read_json(out / SWEEP_FILE)
    if record is None or record.get("format") != FORMAT:
        raise SfnError(f"{out} holds no sweep ({SWEEP_FILE} missing or not written by `sfn sweep`): pass the --out "
                       "folder of `sfn sweep` or `sfn sweep --plan`.")
    metric = metric or record["metric"]
    if Path(record["recipe"]).is_file() and _sha(record["recipe"]) != record["recipe_sha256"]:
        raise SfnError(f"recipe {record['recipe']} changed since this sweep was planned: its points no longer show "
                       "what the recipe does; sweep again into a new folder.")
    rows = _run_rows(out, record, metric)
    done = [r for r in rows if r["status"] == "done"]
    missing_metric = [r["name"] for r in done if r.get(metric) is None]
    if missing_metric:
        raise SfnError(f"point {missing_metric[0]} finished without {metric!r} in its manifest metrics: the recipe "
                       "needs a validation split (validation_fraction), and --metric must be one of the eval_* "
                       "metrics training records.")
    ranked = seed_points(rows, metric, record["seeds"]) if record.get("seeds") else rows
    best = choose_best(ranked, metric)
    for row in ranked:
        row["best"] = best.get(row["variant"]) is row
    for row in rows:
        row["best"] = any(b["name"] == row.get("point", row["name"]) for b in best.values())
    notes = _edge_notes(ranked, best)
    summary = {**record, "metric": metric, "greater_is_better": greater_is_better(metric), "points": rows,
               "best": {variant: row["name"] for variant, row in best.items()}, "notes": notes,
               "finished": len(done), "missing": [r["name"] for r in rows if r["status"] != "done"]}
    if record.get("seeds"):
        summary["seed_points"] = ranked
    plot = _plot(ranked, metric, out / "sweep.png")
    summary["plot"] = plot.name if plot else None
    write_json(out / SWEEP_FILE, summary)
    markdown = out / "sweep.md"
    markdown.write_text(sweep_markdown(summary), encoding="utf-8")
    _write_point_records(out, done, ranked, best, metric)
    return {"json": out / SWEEP_FILE, "markdown": markdown, "plot": plot, "rows": rows, "best": best,
            "metric": metric, "notes": notes, "seed_points": ranked if record.get("seeds") else None}


def _run_rows(out: Path, record: dict, metric: str) -> list[dict]:
    """One row per run (a point, or a point's seed in a seeded sweep), from its manifest."""
    rows = []
    for entry in record["points"]:
        manifest = finished_manifest(out, entry)
        metrics = (manifest or {}).get("metrics", {})
        lr = entry["settings"].get(LR)
        if lr is None and manifest:
            lr = manifest.get("recipe", {}).get("training", {}).get(LR)
        rows.append({
            "name": entry["name"], "point": entry.get("point", entry["name"]), "seed": entry.get("seed"),
            "settings": entry["settings"], "variant": entry["variant"],
            "learning_rate": None if lr is None else float(lr), "status": "done" if manifest else "missing",
            metric: metrics.get(metric), "eval_loss": metrics.get("eval_loss"),
            "eval_mean_token_accuracy": metrics.get("eval_mean_token_accuracy"),
            "train_loss": metrics.get("train_loss"), "train_runtime_s": metrics.get("train_runtime"),
            "validation_rows": metrics.get("validation_rows"), "train_rows": metrics.get("train_rows"),
            "folder": str(out / "points" / entry["name"]), "command": entry["command"], "best": False,
        })
    return rows


def seed_points(rows: list[dict], metric: str, seeds: list[int]) -> list[dict]:
    """One row per grid point of a seeded sweep: `metric` (and the other validation figures) is the mean over its
    seeds, with `<metric>_sd` (sample sd), `<metric>_min`/`_max` and `n_seeds` finished; a point whose every seed
    has not finished has no mean (None), so it cannot be chosen on the luck of the seeds that did."""
    points: dict[str, list[dict]] = {}
    for row in rows:
        points.setdefault(row["point"], []).append(row)
    out = []
    for name, runs in points.items():
        done = [r for r in runs if r["status"] == "done" and _finite(r.get(metric))]
        values = [r[metric] for r in done]
        complete = len(done) == len(seeds)
        mean = lambda key: (sum(r[key] for r in done) / len(done)  # noqa: E731
                            if complete and all(_finite(r.get(key)) for r in done) else None)
        out.append({**{k: runs[0][k] for k in ("settings", "variant", "learning_rate", "validation_rows",
                                                "train_rows")},
                    "name": name, "status": "done" if complete else "missing", "n_seeds": len(done),
                    "seeds": [r["seed"] for r in done], "runs": [r["name"] for r in runs], "best": False,
                    metric: mean(metric), "eval_loss": mean("eval_loss"),
                    "eval_mean_token_accuracy": mean("eval_mean_token_accuracy"), "train_loss": mean("train_loss"),
                    "train_runtime_s": mean("train_runtime_s"),
                    f"{metric}_sd": statistics.stdev(values) if len(values) > 1 else None,
                    f"{metric}_min": min(values, default=None), f"{metric}_max": max(values, default=None)})
    return out


def _write_point_records(out: Path, done: list[dict], ranked: list[dict], best: dict, metric: str) -> None:
    """Each finished run's `sfn_sweep.json`: what it was compared with and whether its point won (`value` is the
    point's metric: its mean over seeds in a seeded sweep, where `run_value` is this run's own)."""
    by_point = {r["name"]: r for r in ranked}
    for row in done:
        point = by_point[row.get("point", row["name"])]
        tried = [r for r in ranked if r["variant"] == row["variant"] and r["status"] == "done"]
        winner = best.get(row["variant"])
        write_json(Path(row["folder"]) / POINT_RECORD, {
            "format": FORMAT, "sweep": str(out.resolve()), "point": point["name"], "seed": row.get("seed"),
            "settings": row["settings"], "variant": row["variant"], "metric": metric,
            "greater_is_better": greater_is_better(metric), "run_value": row[metric], "n_seeds": point.get("n_seeds"),
            "value": row[metric] if point[metric] is None else point[metric], "point_complete": point["status"] == "done",
            "best": point["best"], "learning_rate": row["learning_rate"],
            "chosen_learning_rate": winner["learning_rate"] if winner else None,
            "tried": [{"learning_rate": r["learning_rate"], "value": r[metric]} for r in tried],
        })


def _edge_notes(rows: list[dict], best: dict[str, dict]) -> list[str]:
    """A best rate at the end of the rates tried may not be the best rate at all: say so."""
    notes = []
    for variant, row in best.items():
        rates = sorted({r["learning_rate"] for r in rows if r["variant"] == variant and r["status"] == "done"
                        and r["learning_rate"] is not None})
        if len(rates) > 1 and row["learning_rate"] in (rates[0], rates[-1]):
            end = "smallest" if row["learning_rate"] == rates[0] else "largest"
            notes.append(f"{variant + ': the' if variant else 'The'} best learning rate {row['learning_rate']:g} is "
                         f"the {end} tried; extend the grid past it to know it is the best.")
    return notes


def sweep_markdown(summary: dict, heading: str = "#") -> str:
    metric, rows, seeds = summary["metric"], summary.get("seed_points") or summary["points"], summary.get("seeds")
    keys = [k for k in summary["grid"] if k != LR]
    direction = "highest" if summary["greater_is_better"] else "lowest"
    first = next((r for r in rows if r.get("validation_rows")), None)
    split = (f"{first['validation_rows']} validation rows held out of {first['validation_rows'] + first['train_rows']}"
             if first and first.get("train_rows") is not None else "the recipe's validation split")
    lines = [f"{heading} Sweep of {summary['recipe']}", "",
             f"{len(rows)} points ({summary['finished']} finished), each its own `sfn train` run, ranked on {split} "
             f"(never the test task) by {metric}; `best` = the {direction} {metric} of each variant "
             f"(a variant is one combination of {', '.join(keys) if keys else 'the grid keys'} other than "
             "learning_rate).", "",
             *([f"Each point trained on seeds {', '.join(map(str, seeds))}: {metric} is the mean over seeds ± their "
                f"standard deviation [range], and `best` is chosen on the mean among points whose every seed "
                "finished; the other columns are means over seeds.", ""] if seeds else []),
             "| " + " | ".join(["learning_rate", *keys, metric]
                                + ([] if metric == "eval_loss" else ["eval_loss"])
                                + ["val. token acc.", "train loss", "train time (s)", "best"]) + " |",
             "|" + "---|" * (len(keys) + 6 + (metric != "eval_loss"))]
    for r in sorted(rows, key=lambda r: (r["variant"], r["learning_rate"] or 0)):
        cells = [_fmt(r["learning_rate"], 3), *[r["settings"][k] for k in keys],
                 _seed_cell(r, metric, len(seeds)) if seeds else _fmt(r.get(metric))]
        if metric != "eval_loss":
            cells.append(_fmt(r["eval_loss"]))
        cells += [_fmt(r["eval_mean_token_accuracy"]), _fmt(r["train_loss"]), _fmt(r["train_runtime_s"], 3),
                  "**best**" if r["best"] else ("missing" if r["status"] != "done" else "")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {note}" for note in summary.get("notes", [])]
    if summary.get("missing"):
        lines.append(f"- {len(summary['missing'])} point(s) have no result yet: {', '.join(summary['missing'])}.")
    if summary.get("plot"):
        lines += ["", f"![{metric} vs learning rate]({summary['plot']})"]
    lines += ["", f"Flags for every point: `{shlex.join(summary['flags'])}`" if summary["flags"] else "", ""]
    return "\n".join(lines)


def _seed_cell(row: dict, metric: str, n_seeds: int) -> str:
    """"0.4123 ± 0.0131 [0.3999, 0.4261]" over the seeds; a point with seeds still missing shows how many finished."""
    if row.get(metric) is None:
        return f"— ({row['n_seeds']}/{n_seeds} seeds)"
    sd = row.get(f"{metric}_sd")
    spread = f" ± {_fmt(sd, 3)}" if sd is not None else ""
    return f"{_fmt(row[metric])}{spread} [{_fmt(row[f'{metric}_min'])}, {_fmt(row[f'{metric}_max'])}]"


def log_scale_if_wide(ax, values: list[float]) -> None:
    """A log y axis when the values span more than a factor 10 (a diverged point would flatten the others), with
    plain tick labels."""
    import matplotlib.ticker as ticker

    if min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _plot(rows: list[dict], metric: str, path: Path) -> Path | None:
    done = [r for r in rows if _finite(r.get(metric)) and r["learning_rate"] is not None]
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in done))
    fig, ax = plt.subplots(figsize=(6.4, 3.6 + 0.18 * max(0, len(variants) - 4)))
    cmap = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20")
    for i, variant in enumerate(variants):
        mine = sorted((r for r in done if r["variant"] == variant), key=lambda r: r["learning_rate"])
        color = cmap(i % cmap.N)
        ax.plot([r["learning_rate"] for r in mine], [r[metric] for r in mine], marker="o", color=color,
                label=variant or "all points")
        spread = [r for r in mine if r.get(f"{metric}_min") is not None]  # a seeded sweep: the range over seeds
        ax.vlines([r["learning_rate"] for r in spread], [r[f"{metric}_min"] for r in spread],
                  [r[f"{metric}_max"] for r in spread], color=color, alpha=0.6)
        for r in mine:
            if r["best"]:
                ax.plot(r["learning_rate"], r[metric], marker="*", markersize=16, color=color,
                        markeredgecolor="black", linestyle="none")
    ax.set_xscale("log")
    log_scale_if_wide(ax, [r[metric] for r in done])
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"{metric} (validation)")
    ax.set_title(f"{metric} vs learning rate (star = best of its variant)")
    ax.grid(True, which="both", alpha=0.3)
    if len(variants) > 1 or variants[0]:
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# CLI




def cli_main(argv: list[str]) -> int:
    p = ArgumentParser(prog="sfn sweep", description=__doc__.split("\n")[0], allow_abbrev=False,
                epilog="Any other --key value is a recipe flag given to every point (as in `sfn train`).")
    p.add_argument("--config", help="the recipe YAML every point trains")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2,...",
                   help="a recipe key and its values (repeatable; the points are the product)")
    p.add_argument("--out", help="sweep folder: points/<name>/ per point, logs/, sweep.json, sweep.md, sweep.png")
    p.add_argument("--metric", default=None, help="validation metric that ranks the points (default eval_loss; "
                   "also eval_mean_token_accuracy)")
    p.add_argument("--seeds", metavar="S1,S2,...", help="train every point once per training seed (e.g. 42,43,44); "
                   "a point's metric is the mean over its seeds, and the best point is chosen on that mean")
    p.add_argument("--plan", action="store_true", help="train nothing: print one launch command per point and "
                   "write OUT/sweep_array.sbatch")
    p.add_argument("--collect", metavar="DIR", help="build the table, JSON and plot of a sweep from its finished points")
    p.add_argument("--launcher", help="command that trains one point, before its --config (default: this "
                   "installation's `sfn train`; e.g. 'torchrun --nproc_per_node 8 train/sft.py')")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="--plan: memory of one GPU in GiB, to flag a point "
                   "whose predicted peak does not fit (default 80)")
    p.add_argument("--nproc", type=int, default=None, help="--plan: GPUs per point for the memory prediction "
                   "(default: the launcher's --nproc_per_node / --num_processes, else 1)")
    p.add_argument("--sbatch-option", action="append", metavar="OPTION",
                   help="an #SBATCH line for --plan's script, e.g. '--gres=gpu:8' (repeatable)")
    ns, extra = p.parse_known_args(argv)
    if ns.collect:
        if ns.config or ns.grid or ns.plan or ns.seeds:
            raise SfnError("--collect DIR reads a finished or planned sweep: give it alone (with --metric at most).")
        result = collect(ns.collect, ns.metric)
        print(Path(result["markdown"]).read_text())
        return 0
    if not ns.config or not ns.out:
        raise SfnError("give --config RECIPE.yaml, --grid KEY=V1,V2,... and --out DIR (or --collect DIR).")
    metric = ns.metric or "eval_loss"
    if ns.plan:
        planned = plan_sweep(ns.config, ns.grid, ns.out, extra, metric=metric, launcher=ns.launcher,
                             sbatch_options=ns.sbatch_option, seeds=parse_seeds(ns.seeds))
        print("\n".join(planned["commands"]))
        print(memory_lines(planned, ns.launcher, ns.nproc, ns.gpu_memory))
        print(f"# slurm array script: {planned['sbatch']}   afterwards: sfn sweep --collect {ns.out}")
        return 0
    run_sweep(ns.config, ns.grid, ns.out, extra, metric=metric, launcher=ns.launcher, seeds=parse_seeds(ns.seeds))
    return 0
