"""Stages of a pipeline, each cached by the hash of its inputs and resumable after a kill.

A stage owns an output folder and a marker file `<markers>/<name>.json`. The marker is written last (atomically) and
holds the hash of the stage's inputs: settings, the fingerprints of the checkpoints it reads, the contents of the
recipes and task files it uses. A stage is done when its marker exists and holds the hash of its inputs as they are
now; then it is never redone. Anything else -- no marker (killed half-way), or a marker of other inputs -- clears the
stage's folder and runs it again, after removing the old marker first, so a kill during the rerun cannot leave a
marker that looks current. Each completed run gets a fresh `run_id`, which downstream stages that read files rather
than checkpoints (a report) include in their own inputs.

Used by `sfn study` and by `sfn lab` (its data, base, fine-tune, sweep, gadgets and eval stages).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .errors import SfnError


def input_key(inputs: dict) -> str:
    """sha256 of the inputs' canonical JSON."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (recipes, task files, datasets are inputs by content, not by name)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


@dataclass
class Stage:
    """One unit of work. `inputs()` may read upstream outputs (fingerprints), so it is called only when every stage
    in `needs` is done; `build()` writes into `folder` (cleared first) and returns facts to keep in the marker."""

    name: str
    kind: str
    what: str  # for progress lines: "model oproj", "A -> B"
    needs: list[str]
    inputs: Callable[[], dict]
    build: Callable[[], dict | None]
    folder: Path | None = None
    clear: bool = True  # False: the folder is written by a launch outside the stage, which `build` only records
    commands: list[str] = field(default_factory=list)  # what a cluster user would launch for it (`--plan`)
    notes: list[str] = field(default_factory=list)
    concurrent: bool = False  # may run beside other concurrent stages (`jobs` > 1): a subprocess writing its folder


class StageRunner:
    """Runs stages in the order given, skipping done ones, with progress lines: stage, what, how many left, elapsed."""

    def __init__(self, stages: list[Stage], markers: Path, log: Callable[[str], None] = print, prefix: str = "stage"):
        self.stages = {s.name: s for s in stages}
        self.order = [s.name for s in stages]
        self.markers = Path(markers)
        self.log = log
        self.prefix = prefix
        self._inputs: dict[str, dict] = {}
        self.ran: list[str] = []
        self.cached: list[str] = []

    # -- state -------------------------------------------------------------------------------------------------------
    def marker_path(self, name: str) -> Path:
        return self.markers / f"{name.replace(':', '__')}.json"

    def marker(self, name: str) -> dict | None:
        try:
            return json.loads(self.marker_path(name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def inputs(self, name: str) -> dict:
        """The stage's inputs, computed once per run (fingerprints of large checkpoints are not free)."""
        if name not in self._inputs:
            self._inputs[name] = self.stages[name].inputs()
        return self._inputs[name]

    def key(self, name: str) -> str:
        return input_key({"stage": name, **self.inputs(name)})

    def is_done(self, name: str) -> bool:
        marker = self.marker(name)
        if marker is None:
            return False
        if any(not self.is_done(up) for up in self.stages[name].needs):
            return False
        return marker.get("key") == self.key(name)

    def missing_upstream(self, name: str) -> str | None:
        """The first stage `name` needs (directly or further up) that is not done, or None."""
        for up in self.stages[name].needs:
            if not self.is_done(up):
                return self.missing_upstream(up) or up
        return None

    # -- running -----------------------------------------------------------------------------------------------------
    def run(self, names: list[str] | None = None, *, check_upstream: bool = False, jobs: int = 1) -> dict:
        """Run `names` (default all) in pipeline order; with `check_upstream`, a stage whose upstream is not done
        fails in one line naming it (a job array runs one stage per job, so nothing upstream is run implicitly).
        With `jobs` > 1, consecutive concurrent stages (training subprocesses) that do not need each other run up to
        `jobs` at a time, the next starting as one ends; every other stage runs alone, in order."""
        names = [n for n in self.order if names is None or n in names]
        started = time.perf_counter()
        i = 0
        while i < len(names):
            group = self._group(names, i, jobs)
            heads = {name: f"[{self.prefix} {i + k}/{len(names)} | {{clock}}] {name} ({self.stages[name].what})"
                     for k, name in enumerate(group, 1)}
            todo = [name for name in group if not self._skip(name, heads[name], check_upstream, started)]

            def build(name: str) -> None:
                head = heads[name].replace("{clock}", clock(time.perf_counter() - started))
                self.log(f"{head}: running, {len(names) - names.index(name) - 1} after it"
                         + (f" (up to {jobs} at once)" if len(todo) > 1 else ""))
                self._build(self.stages[name])
                self.log(f"{head}: finished in {self.marker(name)['seconds']:.1f} s")

            self._build_all(todo, build, jobs)
            self.ran += todo
            i += len(group)
        self.log(f"[{self.prefix}] {len(self.ran)} stage(s) ran, {len(self.cached)} were done before; "
                 f"{clock(time.perf_counter() - started)} in all")
        return {"ran": list(self.ran), "cached": list(self.cached)}

    def _group(self, names: list[str], i: int, jobs: int) -> list[str]:
        """names[i] alone, or with the concurrent stages right after it that need none of the group (`jobs` > 1)."""
        group = [names[i]]
        while (jobs > 1 and i + len(group) < len(names)
               and all(self.stages[n].concurrent for n in (group[0], names[i + len(group)]))
               and not set(self.stages[names[i + len(group)]].needs) & set(group)):
            group.append(names[i + len(group)])
        return group

    def _skip(self, name: str, head: str, check_upstream: bool, started: float) -> bool:
        """True when stage `name` is done (said in its progress line); fails in one line when its upstream is not."""
        missing = self.missing_upstream(name)
        if missing is not None:
            if check_upstream:
                raise SfnError(f"stage {name} needs stage {missing}, which has not finished: run it first "
                               f"(`--stage {missing}`), or run the study without --stage.")
            raise SfnError(f"stage {name} cannot start: stage {missing} did not finish.")  # order bug
        if self.is_done(name):
            self.cached.append(name)
            self.log(f"{head.replace('{clock}', clock(time.perf_counter() - started))}: done before, skipped")
            return True
        self.key(name)  # inputs (fingerprints) computed here, once, before any thread starts
        return False

    def _build_all(self, names: list[str], build: Callable[[str], None], jobs: int) -> None:
        """build(name) for each, up to `jobs` at once (threads, each waiting on its subprocess) when there are
        several. After a failure or an interruption no further one starts; a failure is said when it happens and
        raised after the running ones have ended (each finished one keeps its marker); an interruption stops them."""
        if len(names) <= 1 or jobs <= 1:
            for name in names:
                build(name)
            return
        from concurrent.futures import ThreadPoolExecutor

        from .subprocess_run import stopping_children_on_interrupt

        failed = threading.Event()

        def guarded(name: str) -> None:
            if failed.is_set():
                return
            try:
                build(name)
            except Exception as error:
                failed.set()
                self.log(f"[{self.prefix}] {name} failed: {error} -- no further stage starts; waiting for those "
                         "still running")
                raise

        pool = ThreadPoolExecutor(max_workers=jobs)
        try:
            with stopping_children_on_interrupt():
                futures = [pool.submit(guarded, name) for name in names]
                try:
                    errors = [f.exception() for f in futures]
                except BaseException:
                    failed.set()  # before the children are stopped: no queued stage starts after them
                    raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        for error in errors:
            if error is not None:
                raise error

    def _build(self, stage: Stage) -> None:
        key = self.key(stage.name)
        marker = self.marker_path(stage.name)
        marker.unlink(missing_ok=True)  # before touching the folder: a kill from here on leaves the stage not done
        if stage.clear and stage.folder is not None and stage.folder.exists():
            shutil.rmtree(stage.folder)
        started = time.perf_counter()
        facts = stage.build() or {}
        record = {"stage": stage.name, "key": key, "run_id": uuid.uuid4().hex, "inputs": self.inputs(stage.name),
                  "seconds": time.perf_counter() - started,
                  "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **facts}
        marker.parent.mkdir(parents=True, exist_ok=True)
        from .manifest import write_json

        write_json(marker, record)


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss, for progress lines."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
