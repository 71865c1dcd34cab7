"""Does grouping rows by length (the sdpa/eager default) change what a fine-tune learns?  A lab-size experiment.

    .venv/bin/python bench/batch_composition.py --root /tmp/sfn-batching              # full + oproj, seeds 42 43
    .venv/bin/python bench/batch_composition.py --recipes full --seeds 42,43,44 --data length-mix

The lab's base model A and data (`sfn lab --stage base`, cached under --root) are fine-tuned with the lab's own
recipes (recipes/lab/<recipe>.yaml, through `sfn train`, one process each) once per seed and sampling: padded batches of
randomly sampled rows (`train_sampling_strategy: random`, TRL's default), transformers' `group_by_length`
(mega-batches of 50 batches sorted by length), and `auto`: the key left unset, which on sdpa is sfn's length buckets
(batches of similar rows in random order, sfn_train/batching.py). Everything else is the same, including the seed;
grouping changes which rows share a batch and the order of batches. Each fine-tune is evaluated greedily on the lab's 200
held-out multi-step problems (`lab_reason`). Printed per recipe: final training loss (mean of the last logged
losses) and pass@1 of each run, the mean difference grouped - random over seeds, and a paired bootstrap over the
problems of the pooled runs.

`--data lab` trains on the lab's own reasoning traces (2-4 steps: similar lengths, so grouping changes little);
`--data length-mix` on as many rows of lab problems whose lengths follow bench/length_mix.py (1 to ~60 steps at the
lab's 256-token context), where grouping changes batch composition a lot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def final_loss(run: Path, last: int = 3) -> float:
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    return statistics.mean(losses[-last:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/sfn-batching"))
    parser.add_argument("--size", default="small")
    parser.add_argument("--recipes", default="full,oproj")
    parser.add_argument("--seeds", default="42,43")
    parser.add_argument("--data", choices=["lab", "length-mix"], default="lab")
    parser.add_argument("--strategies", default="random,group_by_length,auto",
                        help="train_sampling_strategy values; `auto` leaves it unset: sfn's choice for the kernel")
    parser.add_argument("--lab-seed", type=int, default=42, help="seed of the lab's data and base model")
    args = parser.parse_args(argv)

    from sfn_train.evaluation import evaluate, paired_bootstrap
    from sfn_train.lab.pipeline import Lab
    from sfn_train.lab.problems import shipped_tasks

    lab = Lab(args.root / "lab", args.size, args.lab_seed)
    lab.data()
    base = lab.base()
    data = lab.root / "data" / "sft_reasoning.jsonl"
    if args.data == "length-mix":
        from length_mix import length_mix_rows

        rows = sum(1 for _ in open(data))
        data = args.root / "length_mix.jsonl"
        held_out = {row["problem"] for rows in shipped_tasks().values() for row in rows}  # never trained on
        with open(data, "w") as f:
            for row in length_mix_rows(rows, context=256, seed=args.lab_seed):
                if row["prompt"] not in held_out:
                    f.write(json.dumps(row) + "\n")
    strategies = args.strategies.split(",")
    results = {}
    for recipe in args.recipes.split(","):
        for seed in map(int, args.seeds.split(",")):
            for strategy in strategies:
                out = args.root / f"{args.data}-{recipe}-{strategy}-{seed}"
                if not (out / "trainer_state.json").exists():
                    keys = {} if strategy == "auto" else {"train_sampling_strategy": strategy}
                    lab.train(recipe, base, data, out, seed=seed, logging_steps=5, **keys)
                evals = args.root / f"eval-{out.name}"
                if not evals.exists():
                    evaluate([{"path": str(out), "label": out.name}], ["lab_reason"], evals, temperature=0.0,
                             samples=1, max_new_tokens=64, seed=seed, batch_size=100, progress=False)
                result = json.loads(next(evals.glob("*.json")).read_text())
                manifest = json.loads((out / "sfn_manifest.json").read_text())
                results[(recipe, seed, strategy)] = {
                    "loss": final_loss(out), "pass_at_1": result["summary"]["pass_at_1"],
                    "sampling": manifest["attention"].get("train_sampling_strategy"),
                    "correct": [float(p["samples"][0]["correct"]) for p in result["problems"]]}
                r = results[(recipe, seed, strategy)]
                print(f"{recipe:<6} seed {seed} {strategy:<16} ({r['sampling']}) final loss {r['loss']:.4f}  "
                      f"pass@1 {r['pass_at_1']:.3f}", flush=True)

    print("\n| recipe | data | seed | sampling | final training loss | pass@1 (lab_reason, 200 problems) |")
    print("|---|---|---|---|---|---|")
    for (recipe, seed, strategy), r in results.items():
        print(f"| {recipe} | {args.data} | {seed} | {r['sampling']} | {r['loss']:.4f} | {r['pass_at_1']:.3f} |")
    for recipe in args.recipes.split(","):
        seeds = sorted({s for (rc, s, st) in results if rc == recipe})
        base_runs = {s: results[(recipe, s, "random")] for s in seeds if (recipe, s, "random") in results}
        spread = [abs(base_runs[a]["pass_at_1"] - base_runs[b]["pass_at_1"]) for i, a in enumerate(base_runs)
                  for b in list(base_runs)[i + 1:]]
        for strategy in strategies:
            if strategy == "random" or not base_runs:
                continue
            pairs = [(results[(recipe, s, strategy)], base_runs[s]) for s in base_runs if (recipe, s, strategy) in results]
            a = [c for x, _ in pairs for c in x["correct"]]
            b = [c for _, y in pairs for c in y["correct"]]
            test = paired_bootstrap(a, b)
            print(f"{recipe}: {strategy} ({pairs[0][0]['sampling']}) - random over {len(pairs)} seeds: final loss "
                  f"{statistics.mean(x['loss'] - y['loss'] for x, y in pairs):+.4f}, pass@1 "
                  f"{statistics.mean(x['pass_at_1'] - y['pass_at_1'] for x, y in pairs):+.3f} (paired bootstrap over "
                  f"{len(a)} problem-runs: delta {test['delta']:+.3f} [{test['ci_low']:+.3f}, {test['ci_high']:+.3f}], "
                  f"p {test['p_value']:.3f}); largest seed-to-seed difference of random alone "
                  f"{max(spread) if spread else float('nan'):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
