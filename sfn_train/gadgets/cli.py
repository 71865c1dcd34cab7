"""`sfn delta | merge | destroy | plugin`: argparse front ends over the gadget functions.

Each takes its own argv (what follows the command name) and returns an exit code; `sfn_train.cli.main` turns an
`SfnError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import shlex

from ..arguments import ArgumentParser
from .delta import SAMPLE, delta
from .destroy import MODES, destroy
from .merge import merge
from ..plugin import plugin_apply
from .extract import plugin_extract


def _command(name: str, argv: list[str]) -> str:
    return shlex.join(["sfn", *name.split(), *argv])


def _selection(parser: argparse.ArgumentParser, what: str, modules_default: str | None = "o_proj") -> None:
    parser.add_argument("--modules", default=modules_default,
                        help=f"roles or regexes, comma-separated, of the tensors {what} (default o_proj; `all` for every tensor)")
    parser.add_argument("--layers", default="all", help="layers: all, 0-13, 3,5 (default all)")


def _overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")


def delta_main(argv: list[str]) -> int:
    p = ArgumentParser(prog="sfn delta", description="Per-tensor and per-role weight change from BASE to OTHER.")
    p.add_argument("base", help="checkpoint A (folder or hub id)")
    p.add_argument("other", help="checkpoint B, e.g. the reasoning fine-tune of A")
    p.add_argument("--out", required=True, help="folder for delta.json, delta.csv and the PNGs")
    p.add_argument("--sample", type=int, default=SAMPLE,
                   help=f"elements per tensor used for histograms and moments (default {SAMPLE}); norms use all")
    p.add_argument("--seed", type=int, default=0, help="seed of the element sample")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    _overwrite(p)
    a = p.parse_args(argv)
    delta(a.base, a.other, a.out, sample=a.sample, seed=a.seed, plots=not a.no_plots, overwrite=a.overwrite)
    print(f"wrote {a.out}/delta.json, delta.csv and plots")
    return 0


def merge_main(argv: list[str]) -> int:
    p = ArgumentParser(prog="sfn merge", description="BASE with the selected modules taken from DONOR.")
    p.add_argument("base")
    p.add_argument("donor")
    p.add_argument("--out", required=True, help="folder for the merged checkpoint")
    _selection(p, "taken from DONOR")
    p.add_argument("--alpha", type=float, default=1.0,
                   help="selected tensors become (1-alpha)*BASE + alpha*DONOR (default 1.0: DONOR's exact bytes)")
    _overwrite(p)
    a = p.parse_args(argv)
    m = merge(a.base, a.donor, a.out, modules=a.modules, layers=a.layers, alpha=a.alpha, overwrite=a.overwrite,
              command=_command("merge", argv))
    print(f"wrote {a.out}: {m['counts']['from_donor']} tensors from DONOR, {m['counts']['from_base']} from BASE")
    return 0


def destroy_main(argv: list[str]) -> int:
    p = ArgumentParser(prog="sfn destroy", description="Zero, re-initialise, remove or perturb selected modules.")
    p.add_argument("model")
    p.add_argument("--out", required=True, help="folder for the damaged checkpoint")
    _selection(p, "to destroy (not with --mode remove)", modules_default=None)
    p.add_argument("--mode", choices=MODES, default="zero",
                   help="zero | reinit (N(0, std)) | remove (whole --layers) | noise (+scale*std(w)) | scale (*factor)")
    p.add_argument("--std", default="0.02", help="reinit std, or `config` for the config's initializer_range")
    p.add_argument("--scale", type=float, default=0.1, help="noise std relative to each tensor's std (default 0.1)")
    p.add_argument("--factor", type=float, default=0.5, help="scale factor (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    _overwrite(p)
    a = p.parse_args(argv)
    m = destroy(a.model, a.out, modules=a.modules, layers=a.layers, mode=a.mode, std=a.std, scale=a.scale,
                factor=a.factor, seed=a.seed, overwrite=a.overwrite, command=_command("destroy", argv))
    print(f"wrote {a.out}: {m['counts']['changed']} tensors {'removed' if a.mode == 'remove' else 'changed'} ({a.mode})")
    return 0


def plugin_main(argv: list[str]) -> int:
    p = ArgumentParser(prog="sfn plugin", description="Extract or apply a plugin file of selected tensors.")
    sub = p.add_subparsers(dest="action", required=True)
    ex = sub.add_parser("extract", help="the selected tensors of TUNED that differ from BASE, as one file")
    ex.add_argument("tuned")
    ex.add_argument("--base", required=True, help="the checkpoint TUNED was fine-tuned from")
    ex.add_argument("--out", required=True, help="plugin file to write, e.g. oproj.safetensors")
    _selection(ex, "to extract")
    _overwrite(ex)
    ap = sub.add_parser("apply", help="BASE with the plugin's tensors in place of its own")
    ap.add_argument("base")
    ap.add_argument("plugin", help="plugin .safetensors file")
    ap.add_argument("--out", required=True, help="folder for the patched checkpoint")
    ap.add_argument("--force", action="store_true", help="apply even if BASE is not the plugin's base (fingerprint)")
    _overwrite(ap)
    a = p.parse_args(argv)
    if a.action == "extract":
        s = plugin_extract(a.tuned, a.base, a.out, modules=a.modules, layers=a.layers, overwrite=a.overwrite)
        print(f"wrote {a.out}: {len(s['tensors'])} tensors ({s['unchanged']} selected tensors unchanged, left out)")
    else:
        m = plugin_apply(a.base, a.plugin, a.out, force=a.force, overwrite=a.overwrite,
                         command=_command("plugin", argv))
        print(f"wrote {a.out}: {m['counts']['from_plugin']} tensors from the plugin")
    return 0
