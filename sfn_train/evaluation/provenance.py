"""How each compared model was trained, read from its folder: the learning rate, and how that rate was chosen.

Why `sfn compare` needs it: o_proj-only and full fine-tunes are only comparable when each ran at a learning rate
tuned for it, so a comparison states each model's rate next to its test result, and, for a model that won an
`sfn sweep`, the validation metric that chose it (written by the sweep as `sfn_sweep.json` in the point's folder).
Only JSON files are read: evaluation does not depend on the trainer or the sweep code.
"""

from __future__ import annotations

from pathlib import Path

from ..manifest import MANIFEST_FILE, read_json

SWEEP_RECORD = "sfn_sweep.json"


def training_provenance(model_path: str | None) -> dict | None:
    """{learning_rate, how, sweep?} for a local checkpoint folder written by `sfn train` or `sfn sweep`, else None."""
    if not model_path:  # a result that names no model folder (made elsewhere, or by hand)
        return None
    folder = Path(model_path)
    if not folder.is_dir():
        return None
    sweep = read_json(folder / SWEEP_RECORD)
    if sweep:
        tried = sorted(t["learning_rate"] for t in sweep.get("tried", []) if t.get("learning_rate") is not None)
        rates = ", ".join(f"{r:g}" for r in tried)
        direction = "highest" if sweep.get("greater_is_better") else "lowest"
        if sweep.get("n_seeds"):  # a seeded sweep: the value is the point's mean over its seeds
            direction = f"{direction} mean over {sweep['n_seeds']} seeds of"
        if sweep.get("best"):
            how = (f"sweep: {direction} validation {sweep['metric']} ({sweep['value']:.4g}) of {len(tried)} rates "
                   f"({rates}) in {sweep['sweep']}")
        else:
            how = (f"sweep point that did NOT win its sweep (validation {sweep['metric']} {sweep['value']:.4g}; the "
                   f"sweep chose {sweep.get('chosen_learning_rate')}) in {sweep['sweep']}")
        return {"learning_rate": sweep.get("learning_rate"), "how": how, "sweep": sweep}
    manifest = read_json(folder / MANIFEST_FILE)
    if manifest:
        lr = manifest.get("recipe", {}).get("training", {}).get("learning_rate")
        val = manifest.get("metrics", {}).get("eval_loss")
        how = "set by the recipe (no sweep record)" + (f"; validation eval_loss {val:.4g}" if val is not None else "")
        return {"learning_rate": lr, "how": how, "sweep": None}
    return None


def provenance_lines(rows: list[dict], results: dict) -> list[str]:
    """Markdown table: one line per model with its test result, learning rate and how the rate was chosen.
    `results` maps label -> one eval result of that model (for its path). Empty when no model has a record."""
    found = {label: training_provenance(r["model"].get("path")) for label, r in results.items()}
    if not any(p and p["sweep"] for p in found.values()):
        return []
    lines = ["## Learning rates", "",
             "Each model's training learning rate and how it was chosen (from the model folder's sweep record or "
             "manifest), next to its test result.", "",
             "| model | task | pass@1 | learning rate | how it was chosen |", "|---|---|---|---|---|"]
    for r in rows:
        p = found.get(r["model"])
        lr = "—" if not p or p["learning_rate"] is None else f"{p['learning_rate']:g}"
        lines.append(f"| {r['model']} | {r['task']} | {100 * r['pass_at_1']:.1f} | {lr} | "
                     f"{p['how'] if p else 'not a local sfn train output'} |")
    return lines + [""]
