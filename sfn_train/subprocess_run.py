"""Run one training command (`sfn train ...`, under torchrun or accelerate when asked) as a child process and measure it.

Why a child process: each run's peak memory is then its own (the largest process's RSS, from `wait4`'s rusage), and
a crash or an out-of-memory kill of one run cannot take the caller down. `sfn study`, `sfn sweep` and `sfn lab` all
train through `run_command`.

Stopping the caller stops the child. Ctrl-C in a terminal signals the whole foreground process group, but
`kill -INT <pid>` (a scheduler, a script, a notebook's interrupt) reaches the caller alone: the child used to train on
to the end. While it waits, SIGINT or SIGTERM to the caller (or any exception) is passed on to the child as SIGINT --
`sfn train` then stops as after Ctrl-C, its folder resumed by the same command -- and a child that has not ended
`GRACE_S` seconds later is killed; then the caller's interruption goes on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .manifest import MANIFEST_FILE

QUIET_ENV = {"TOKENIZERS_PARALLELISM": "false"}
GRACE_S = 30.0
_LIVE: set[subprocess.Popen] = set()  # children started by run_command that have not been reaped
_LIVE_LOCK = threading.Lock()
_STOPPING = threading.Event()  # set while stopping_children_on_interrupt stops them: no new child starts


@dataclass
class RunResult:
    exit_code: int
    wall_s: float
    cpu_s: float  # user + system time of the child (and its waited-for children)
    peak_rss_mb: float  # the largest resident set of the child or any child it waited for

    def stats(self) -> dict:
        return {"wall_s": self.wall_s, "cpu_s": self.cpu_s, "peak_rss_mb": self.peak_rss_mb, "exit": self.exit_code}


def run_command(command: list[str], *, env: dict | None = None, log_file: str | os.PathLike | None = None) -> RunResult:
    """Run `command` to its end with `env` over this process's environment (and TOKENIZERS_PARALLELISM=false);
    its output goes to `log_file` when given, else to this process's output. Returns exit code, wall and CPU time
    and peak RSS; never raises on a nonzero exit (the caller says what failed, in its own words)."""
    environment = {**os.environ, **QUIET_ENV, **(env or {})}
    started = time.perf_counter()
    handle = open(log_file, "w") if log_file is not None else None
    try:
        with _LIVE_LOCK:
            if _STOPPING.is_set():
                raise KeyboardInterrupt("stopping: no new training starts")
            proc = subprocess.Popen(command, env=environment, stdout=handle,
                                    stderr=subprocess.STDOUT if handle else None)
            _LIVE.add(proc)
    except BaseException:
        if handle is not None:
            handle.close()
        raise
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM to the caller: handled as SIGINT is
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    except ChildProcessError:  # reaped by stop() from the thread stopping every child (`sfn study --jobs`)
        usage = None
        proc.returncode = proc.returncode if proc.returncode is not None else -signal.SIGINT
    except BaseException:  # Ctrl-C, kill -INT/-TERM or an error here: the child must not train on unobserved
        stop(proc)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        with _LIVE_LOCK:
            _LIVE.discard(proc)
        if handle is not None:
            handle.close()
    cpu_s = usage.ru_utime + usage.ru_stime if usage else 0.0
    return RunResult(proc.returncode, time.perf_counter() - started, cpu_s, usage.ru_maxrss / 1024 if usage else 0.0)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def stopping_children_on_interrupt():
    """For callers that wait on run_command from worker threads (`sfn study --jobs`): SIGTERM to this process is
    handled as SIGINT is, and an interruption (or any exception) while inside stops every live child as `stop` does,
    before it goes on."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    except BaseException:
        with _LIVE_LOCK:
            _STOPPING.set()  # from here no new child starts, so the snapshot below is every child there will be
            children = list(_LIVE)
        stoppers = [threading.Thread(target=stop, args=(proc,)) for proc in children]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        raise
    finally:
        _STOPPING.clear()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def stop(proc: subprocess.Popen, grace_s: float = GRACE_S) -> None:
    """SIGINT to the child, then SIGKILL if it has not ended within `grace_s` seconds; reap it. A Ctrl-C in the
    terminal has already reached the child (same process group): it gets a moment to stop on that one first."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=2)
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def train_command(args: list[str]) -> list[str]:
    """`sfn train ARGS` run with this interpreter (the same environment as the caller)."""
    return [sys.executable, "-m", "sfn_train.cli", "train", *args]


def shown(command: list[str]) -> list[str]:
    """The command as a user would type it: without this interpreter's path in front."""
    return command[1:] if command and command[0] == sys.executable else list(command)


def complete_manifest(folder: Path) -> dict | None:
    """The run's manifest when it says the run completed, else None."""
    import json

    path = Path(folder) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("status") == "complete" else None
