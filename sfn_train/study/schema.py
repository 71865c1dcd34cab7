"""The study file: dataclasses whose fields are the YAML keys, read with one-line errors.

Why dataclasses and a strict reader: the fields document the schema (`sfn study --help` prints them), and a key no
field knows is an error rather than a setting that silently does nothing, as for recipes. Relative paths (recipes,
task files, folders) are read from the folder `sfn study` is launched in, as recipe paths are.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SfnError

BASE, REASONING = "base", "reasoning"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
DESTROY_MODES = ("zero", "reinit", "remove", "noise", "scale")


@dataclass
class Finetune:
    """A variant trained from `base` with an ordinary recipe; its output folder becomes a model of the study."""

    name: str = field(metadata={"help": "model name in the study and the report (letters, digits, _ . + -)"})
    recipe: str = field(metadata={"help": "`sfn train` recipe YAML; the study sets model_name_or_path (base) and "
                                          "output_dir"})
    nproc_per_node: int = field(default=8, metadata={
        "help": "training processes (GPUs) per node in the torchrun launch; the recipe's effective batch assumes it"})
    nnodes: int = field(default=1, metadata={"help": "nodes in the torchrun launch"})
    args: dict = field(default_factory=dict, metadata={
        "help": "more `sfn train` flags over the recipe's keys, e.g. {dataset_name: data/traces.jsonl, "
                "num_train_epochs: 6}"})
    accelerate_config: str | None = field(default=None, metadata={
        "help": "launch with `accelerate launch --config_file` this file (e.g. ds_configs/accelerate_zero3.yaml) "
                "instead of torchrun; processes and nodes still come from nproc_per_node and nnodes"})


@dataclass
class Merge:
    """A = `base` with the selected modules taken from `donor` (the paper's Table 1), no further training."""

    name: str = field(metadata={"help": "model name (letters, digits, _ . + -)"})
    modules: list[str] = field(metadata={"help": "roles or regexes taken from the donor, e.g. [o_proj]"})
    layers: list[str] = field(default_factory=lambda: ["all"], metadata={"help": "layers: all, \"0-13\", [3, 5]"})
    alpha: float = field(default=1.0, metadata={"help": "(1-alpha)*A + alpha*donor; 1.0 copies the donor's bytes"})
    donor: str = field(default=REASONING, metadata={"help": "`reasoning` or the name of a fine-tune"})


@dataclass
class Destroy:
    """The paper's Table 3: one damaged copy of `model` per mode x module (and one for mode `remove`)."""

    modules: list[str] = field(default_factory=list,
                               metadata={"help": "roles or regexes; one column of the table each (not for remove)"})
    model: str = field(default=REASONING, metadata={"help": "`reasoning`, `base` or the name of a fine-tune"})
    modes: list[str] = field(default_factory=lambda: ["zero", "reinit"],
                             metadata={"help": f"any of {', '.join(DESTROY_MODES)} (remove drops whole layers)"})
    layers: list[str] = field(default_factory=lambda: ["all"],
                              metadata={"help": "the damaged layers (the paper: \"5-30\" of 64)"})
    std: float = field(default=0.02, metadata={"help": "reinit: std of the new weights"})
    scale: float = field(default=0.1, metadata={"help": "noise: std relative to each tensor's std"})
    factor: float = field(default=0.5, metadata={"help": "scale: multiplier"})
    seed: int = field(default=0, metadata={"help": "seed of reinit/noise"})
    eval: dict = field(default_factory=dict, metadata={
        "help": "`sfn eval` options for the damaged models only, over the study's `eval` (e.g. a smaller limit)"})


@dataclass
class Study:
    """A study of a base model A (and optionally a reasoning model B fine-tuned from it): fine-tunes, merges,
    destruction, delta and evaluation, with the report."""

    base: str = field(metadata={"help": "A: checkpoint folder or hub id"})
    tasks: list[str] = field(metadata={"help": "registered task names (aime24, math500, ...) or problem .jsonl files"})
    reasoning: str | None = field(default=None, metadata={"help": "B: checkpoint folder or hub id"})
    finetune: list[Finetune] = field(default_factory=list, metadata={"help": "variants trained from A"})
    merges: list[Merge] = field(default_factory=list, metadata={"help": "A with modules of B (or of a fine-tune)"})
    destroy: Destroy | None = field(default=None, metadata={"help": "the destruction grid"})
    delta: bool = field(default=False, metadata={"help": "weight change A -> B and A -> each fine-tune"})
    eval: dict = field(default_factory=dict,
                       metadata={"help": "any `sfn eval` option, e.g. {backend: vllm, samples: 4}"})
    baseline: str | None = field(default=None, metadata={
        "help": "model the comparisons test against (default: reasoning, else base)"})
    out: str | None = field(default=None, metadata={"help": "output folder (default studies/<file name>)"})
    seeds: list[int] = field(default_factory=list, metadata={
        "help": "train every fine-tune once per seed (e.g. [42, 43, 44]: model oproj@42, ...); merges from a "
                "fine-tune, its destruction, deltas and evaluations follow per seed, and the report compares "
                "variants over seeds; empty: one run at the recipe's seed"})

    # -- the models of the study -------------------------------------------------------------------------------------
    def destroyed(self) -> list[tuple[str, str, str | None]]:
        """[(model name, mode, module)] of the destruction grid; `remove` takes whole layers (module None)."""
        if self.destroy is None:
            return []
        out = []
        for mode in self.destroy.modes:
            if mode == "remove":
                out.append(("remove", mode, None))
            else:
                out += [(f"{mode}_{_slug(module)}", mode, module) for module in self.destroy.modules]
        return out

    def per_seed(self, name: str) -> list[tuple[str, int | None]]:
        """[(model name, seed)] of a model the study trains (a fine-tune) or makes from one: `name@seed` per seed
        when the study has seeds, else [(name, None)]. Models that do not depend on a fine-tune stay one model."""
        if not self.seeds or not self.depends_on_finetune(name):
            return [(name, None)]
        return [(seeded(name, s), s) for s in self.seeds]

    def depends_on_finetune(self, name: str) -> bool:
        finetunes = {f.name for f in self.finetune}
        if name in finetunes:
            return True
        merge = next((m for m in self.merges if m.name == name), None)
        if merge is not None:
            return merge.donor in finetunes
        return any(name == n for n, _, _ in self.destroyed()) and self.destroy.model in finetunes

    def model_names(self) -> list[str]:
        names = [BASE] + ([REASONING] if self.reasoning else [])
        names += [f.name for f in self.finetune] + [m.name for m in self.merges]
        return names + [name for name, _, _ in self.destroyed()]

    def seeded_model_names(self) -> list[str]:
        """Every model the study evaluates: `model_names()` with each one that depends on a fine-tune per seed."""
        return [n for name in self.model_names() for n, _ in self.per_seed(name)]


def seeded(name: str, seed: int | None) -> str:
    """The model name of variant `name` trained at `seed` (`oproj@42`); `name` itself without a seed."""
    return name if seed is None else f"{name}@{seed}"


def variant_of(name: str) -> tuple[str, int | None]:
    """(variant, seed) of a study model name: `oproj@42` -> (oproj, 42), `base` -> (base, None)."""
    head, at, tail = name.rpartition("@")
    return (head, int(tail)) if at and tail.isdigit() else (name, None)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_.+-" else "_" for c in text).strip("_") or "x"


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (list,):
        item = typing.get_args(tp)[0]
        if dataclasses.is_dataclass(item):
            return f"a list of {item.__name__} entries"
        return "a list of integers" if item is int else "a list of strings"
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} keys"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _convert(value, tp, where: str):
    """`value` as type `tp`, or an SfnError naming `where`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if origin is list:
        item = args[0]
        if item is str and isinstance(value, (str, int)) and not isinstance(value, bool):
            value = [value]  # `modules: o_proj` is a list of one
        if not isinstance(value, list):
            raise SfnError(f"{where} takes {_type_name(tp)}, not {value!r}.")
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return read_dataclass(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise SfnError(f"{where} takes true or false, not {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SfnError(f"{where} takes an integer, not {value!r}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SfnError(f"{where} takes a number, not {value!r}.")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise SfnError(f"{where} takes a string, not {value!r}.")
        return str(value)
    if tp is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise SfnError(f"{where} takes a mapping (key: value), not {value!r}.")
        return dict(value)
    raise TypeError(f"unsupported field type {tp}")  # a schema bug, not a user error


def read_dataclass(cls, data, where: str):
    """An instance of `cls` from a YAML mapping: unknown keys, missing keys and wrong types are one line each."""
    if not isinstance(data, dict):
        raise SfnError(f"{where} takes {_type_name(cls)} ({', '.join(f.name for f in dataclasses.fields(cls))}), "
                       f"not {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        from ..arguments import did_you_mean

        raise SfnError(f"{where or 'the study'} has unknown key(s) {', '.join(map(str, unknown))}"
                       f"{did_you_mean(list(map(str, unknown)), fields)}: the keys are {', '.join(fields)}.")
    values = {}
    for name, f in fields.items():
        sub = f"{where}.{name}" if where else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SfnError(f"{where or 'the study'} lacks the required key `{name}` ({f.metadata.get('help')}).")
            continue
        values[name] = _convert(data[name], hints[name], sub)
    return cls(**values)


def load_study(path: str | Path) -> Study:
    """Read and check a study file: every problem is one SfnError line naming the file and the key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SfnError(f"study file {path} does not exist; pass a YAML file such as recipes/studies/table1_1.5b.yaml.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise SfnError(f"study file {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}.") from None
    if not isinstance(data, dict):
        raise SfnError(f"study file {path} must be a mapping of keys (base, tasks, ...), not {type(data).__name__}.")
    try:
        study = read_dataclass(Study, data, "")
        check_study(study)
    except SfnError as exc:
        raise SfnError(f"study {path}: {exc}") from None
    if study.out is None:
        study.out = str(Path("studies") / path.stem)
    return study


def check_study(study: Study) -> None:
    """Cross-key checks: names, references between keys, values the gadgets and the evaluation would refuse later."""
    from ..roles import normalize_modules, parse_layers

    for key in ("base", "reasoning"):
        value = getattr(study, key)
        if value is not None and not Path(value).exists() and (value.startswith((".", "/")) or value.count("/") != 1):
            raise SfnError(f"{key} {value!r} is neither an existing folder nor a hub id (org/name): fix the path "
                           "(relative paths start from the folder sfn study is launched in).")
    if study.delta and not study.reasoning and not study.finetune:
        raise SfnError("delta: true compares A with B and with each fine-tune, and the study has neither: add "
                       "`reasoning:` or a fine-tune, or set delta: false.")
    if not study.tasks:
        raise SfnError("tasks is empty: name at least one task (e.g. [aime24]) or a problems .jsonl file.")
    finetunes = [f.name for f in study.finetune]
    own = finetunes + [m.name for m in study.merges]
    for name in own:
        if not NAME_RE.fullmatch(name):
            raise SfnError(f"model name {name!r} must be letters, digits and _ . + - (it names a folder).")
        if name in (BASE, REASONING):
            raise SfnError(f"model name {name!r} is reserved for the study's {name} model; choose another.")
    names = study.model_names()
    twice = [n for n in names if names.count(n) > 1]
    if twice:
        raise SfnError(f"two models of the study are named {twice[0]!r} (fine-tunes, merges and the destruction "
                       "grid's mode_module names share one namespace); rename one.")
    for i, f in enumerate(study.finetune):
        if f.accelerate_config is not None and not Path(f.accelerate_config).is_file():
            raise SfnError(f"finetune[{i}] ({f.name}): accelerate_config {f.accelerate_config} does not exist "
                           "(e.g. ds_configs/accelerate_zero3.yaml; relative paths start from the folder sfn study is "
                           "launched in).")
        if not Path(f.recipe).is_file():
            raise SfnError(f"finetune[{i}] ({f.name}): recipe {f.recipe} does not exist (relative paths start from "
                           "the folder sfn study is launched in).")
        owned = {"config", "model_name_or_path", "output_dir", "overwrite_output_dir"} | ({"seed"} if study.seeds else set())
        if set(f.args) & owned:
            raise SfnError(f"finetune[{i}] ({f.name}): args sets {', '.join(sorted(set(f.args) & owned))}, which the "
                           "study sets itself (the base, the output folder, the seeds): remove it from args.")
        if f.nproc_per_node < 1 or f.nnodes < 1:
            raise SfnError(f"finetune[{i}] ({f.name}): nproc_per_node and nnodes must be at least 1.")
    for i, m in enumerate(study.merges):
        where = f"merges[{i}] ({m.name})"
        if m.donor == REASONING and not study.reasoning:
            raise SfnError(f"{where} takes modules from `reasoning`, but the study names no reasoning model: add "
                           "`reasoning:` or set `donor:` to a fine-tune.")
        if m.donor != REASONING and m.donor not in finetunes:
            raise SfnError(f"{where}: donor {m.donor!r} is neither `reasoning` nor a fine-tune of the study "
                           f"({', '.join(finetunes) or 'none'}).")
        _check_selection(m.modules, m.layers, where, normalize_modules, parse_layers)
    if study.destroy is not None:
        d = study.destroy
        if d.model not in (BASE, REASONING, *finetunes) or (d.model == REASONING and not study.reasoning):
            raise SfnError(f"destroy.model {d.model!r} must be `base`, `reasoning` (when the study has one) or a "
                           f"fine-tune ({', '.join(finetunes) or 'none'}).")
        bad = [m for m in d.modes if m not in DESTROY_MODES]
        if bad or not d.modes:
            raise SfnError(f"destroy.modes {bad or d.modes!r}: use one or more of {', '.join(DESTROY_MODES)}.")
        if any(m != "remove" for m in d.modes) and not d.modules:
            raise SfnError("destroy.modules is empty: name the modules to damage (e.g. [q_proj, o_proj, up_proj]).")
        _check_selection(d.modules or ["o_proj"], d.layers, "destroy", normalize_modules, parse_layers)
    if len(set(study.seeds)) != len(study.seeds):
        raise SfnError(f"seeds {study.seeds} names a seed twice; list each seed once.")
    if study.seeds and not study.finetune:
        raise SfnError("seeds vary the training of fine-tunes, and the study has none: add a `finetune:` entry or "
                       "remove `seeds:`.")
    if study.baseline is not None and study.baseline not in names:
        raise SfnError(f"baseline {study.baseline!r} is not a model of the study ({', '.join(names)}).")
    from .evalopts import parse_eval_options

    parse_eval_options(study.eval, study.tasks, "eval")
    if study.destroy is not None:
        parse_eval_options({**study.eval, **study.destroy.eval}, study.tasks, "destroy.eval")


def _check_selection(modules, layers, where, normalize_modules, parse_layers) -> None:
    if not modules:
        raise SfnError(f"{where}: modules is empty; name at least one role (e.g. o_proj).")
    try:
        normalize_modules(modules)
        parse_layers(layers)
    except SfnError as exc:
        raise SfnError(f"{where}: {exc}") from None


def schema_help() -> str:
    """The study file's keys, from the dataclasses' fields (what `sfn study --help` prints)."""
    lines = []
    for cls, title in ((Study, "study file"), (Finetune, "finetune: entries"), (Merge, "merges: entries"),
                       (Destroy, "destroy:")):
        lines.append(f"{title}")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            value = f.default if f.default is not dataclasses.MISSING else (None if required else f.default_factory())
            default = "required" if required else f"default {value!r}"
            lines.append(f"  {f.name:<15} {_type_name(hints[f.name])}; {default}. {f.metadata.get('help', '')}")
        lines.append("")
    return "\n".join(lines)
