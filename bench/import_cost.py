"""What each package costs a training process: import time and resident memory, and the whole run with and without
the packages sfn_train.lean_imports keeps out.

    .venv/bin/python bench/import_cost.py                  # per-package costs + two tiny `sfn train` runs, 3 rounds

Per package: a fresh interpreter imports what every run imports anyway (torch, transformers) and then the package;
the table gives the package's own RSS and time on top of that (medians over rounds). Then `sfn train` on a tiny model
(one process each, alternating), once as shipped and once with SFN_KEEP_IMPORTS=1 (everything importable gets
imported, as before): peak RSS of the process, RSS at the end of training (steady state), and the packages that were
loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGES = ["peft", "bitsandbytes", "scipy", "deepspeed", "trl", "datasets", "pandas", "accelerate", "sympy",
            "torch._dynamo", "torch._inductor.compile_fx", "matplotlib", "math_verify"]
WATCH = ["peft", "bitsandbytes", "scipy", "deepspeed", "torch._inductor", "matplotlib", "math_verify", "pandas",
         "sympy", "torch._dynamo"]

PROBE = """
import json, os, sys, time
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
import torch, transformers
before, t = rss(), time.perf_counter()
__import__(sys.argv[1])
print("RESULT " + json.dumps({"rss_mb": rss() - before, "s": time.perf_counter() - t}))
"""

RUN = """
import json, os, resource, sys
from sfn_train.lean_imports import keep_unused_packages_out
keep_unused_packages_out()   # what `sfn train` does first, before anything imports transformers
from transformers import TrainerCallback
from sfn_train.config import parse_recipe
from sfn_train.train import run_sft
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
end = {}
class AtEnd(TrainerCallback):
    def on_train_end(self, args, state, control, **kw):
        end["rss_mb"] = rss()
run_sft(*parse_recipe(sys.argv[1:]), callbacks=[AtEnd()])
watch = %r
print("RESULT " + json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              "end_mb": end["rss_mb"],
                              "loaded": sorted(m for m in watch if sys.modules.get(m) is not None)}))
""" % (WATCH,)


def child(code: str, *argv, env=None) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        sys.exit(f"child failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[0][7:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--packages", default=",".join(PACKAGES))
    args = parser.parse_args(argv)

    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    costs = {p: [] for p in args.packages.split(",")}
    for _ in range(args.rounds):
        for p in costs:
            costs[p].append(child(PROBE, p))
    print("\n| package (imported after torch + transformers) | RSS added (MB) | import time (s) |\n|---|---|---|")
    for p, runs in costs.items():
        print(f"| {p} | {statistics.median(r['rss_mb'] for r in runs):.0f} | "
              f"{statistics.median(r['s'] for r in runs):.1f} |")

    from sfn_train.lab.problems import generate, sft_rows, write_jsonl
    from sfn_train.tiny import save_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="sfn-import-cost-") as tmp:
        tmp = Path(tmp)
        base = save_tiny_checkpoint(tmp / "base", "qwen2", seed=0)
        data = write_jsonl(tmp / "rows.jsonl", sft_rows(generate(64, (2, 3), seed=0), "reasoning"))
        flags = ["--model_name_or_path", str(base), "--dataset_name", str(data), "--output_dir", str(tmp / "out"),
                 "--overwrite_output_dir", "true", "--max_steps", "8", "--per_device_train_batch_size", "8",
                 "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"]
        runs = {"lean (as shipped)": [], "SFN_KEEP_IMPORTS=1": []}
        for _ in range(args.rounds):
            runs["lean (as shipped)"].append(child(RUN, *flags, env={"SFN_KEEP_IMPORTS": "0"}))
            runs["SFN_KEEP_IMPORTS=1"].append(child(RUN, *flags, env={"SFN_KEEP_IMPORTS": "1"}))
    print("\n| `sfn train`, tiny model, 8 steps | peak RSS (MB) | RSS at end of training (MB) | loaded |\n|---|---|---|---|")
    for name, rs in runs.items():
        print(f"| {name} | {statistics.median(r['peak_mb'] for r in rs):.0f} | "
              f"{statistics.median(r['end_mb'] for r in rs):.0f} | {', '.join(rs[0]['loaded'])} |")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
