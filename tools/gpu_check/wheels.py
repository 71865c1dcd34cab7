"""The wheels the GPU check carries to a node with no network: the list, and a check of a prepared folder.

    python tools/gpu_check/wheels.py --folder .whl      # after prepare_wheels.sh; exit 1 when a problem is found

Every requirement is checked with its version, before any device time is spent: each carried wheel's Requires-Dist
and sfn-train's own dependencies (pyproject.toml) against what that invocation will have on the node -- the carried
wheels of its parts, then the image's packages with the versions wheels.txt records for them. A requirement with a
version bound on an image package whose version is not recorded cannot be checked here: it is listed as unverified
(the node's `env` step, the first of every run, checks those and stops the run before any training when one fails).
Problems (a missing wheel, a version that does not satisfy a bound, an invocation over 64 MiB) exit 1. Runs with any
Python that has pip (no project install needed).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

try:
    from packaging.markers import Marker
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:  # a bare Python: pip carries its own copy
    from pip._vendor.packaging.markers import Marker  # type: ignore[no-redef]
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.version import Version  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
WHEEL_LIST = HERE / "wheels.txt"
CARRY_LIMIT = 64 * 2**20  # what one device call may carry (working tree included)
PARTS = ("quant", "train")  # each node invocation carries common + one of these
NODE_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
               "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_wheel_list(path: Path = WHEEL_LIST):
    """(part -> ["name==version"], node package -> version or None, accepted name -> reason)."""
    parts: dict[str, list[str]] = {}
    device: dict[str, str | None] = {}
    accepted: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line, _, comment = raw.partition("#")
        words = line.split()
        if not words:
            continue
        if words[0] == "device":
            for word in words[1:]:
                name, _, version = word.partition("==")
                device[normalize(name)] = version or None
        elif words[0] == "accept":
            accepted[normalize(words[1])] = comment.strip()
        else:
            parts.setdefault(words[0], []).append(words[1])
    return parts, device, accepted


def wheel_metadata(wheel: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist lines) from a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    get = lambda key: [l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith(key + ":")]  # noqa: E731
    return get("Name")[0], get("Version")[0], get("Requires-Dist")


def needed_on_node(line: str) -> Requirement | None:
    """The requirement a Requires-Dist line makes on the node (CPython 3.12, no extras), or None."""
    req = Requirement(line)
    if req.marker and not Marker(str(req.marker)).evaluate(NODE_PYTHON):
        return None
    return req


def project_requirements() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def check_requirement(who: str, line: str, have: dict[str, tuple[str | None, str]], accepted: dict[str, str]):
    """A problem with one requirement in an environment `have` (name -> (version or None, where)), or None."""
    req = needed_on_node(line)
    if req is None:
        return None
    name = normalize(req.name)
    if name not in have:
        return f"{who} needs {name}, which is neither carried nor on the node"
    version, where = have[name]
    if not req.specifier or name in accepted:
        return None
    if version is None:
        return f"unverified: {who} needs {name}{req.specifier}; the node's version is not recorded"
    if not req.specifier.contains(Version(version), prereleases=True):
        return f"{who} needs {name}{req.specifier}, {where} has {version}"
    return None


def check_wheels(folder: Path, parts: tuple[str, ...] = PARTS, listing=None) -> list[str]:
    """Problems with a prepared wheel folder: missing wheels, unmet requirements, a call over 64 MiB; requirements
    that cannot be checked here come last, each starting with "unverified:".

    sfn-train's own requirements are checked against every part together: it is installed without dependencies, and
    each part runs the steps that need its share (DeepSpeed in train, bitsandbytes in quant).

    `listing`: what read_wheel_list returns; by default tools/gpu_check/wheels.txt.
    """
    wanted, device, accepted = listing or read_wheel_list()
    problems, carried, sizes = [], {}, {}
    for part, reqs in wanted.items():
        found = {}
        for wheel in sorted((folder / part).glob("*.whl")):
            name, version, requires = wheel_metadata(wheel)
            found[normalize(name)] = (version, requires)
            sizes[part] = sizes.get(part, 0) + wheel.stat().st_size
        for req in reqs:
            name, version = req.split("==")
            if found.get(normalize(name), (None,))[0] != version:
                problems.append(f"{folder / part}: no wheel for {req}")
        extra = set(found) - {normalize(r.split("==")[0]) for r in reqs}
        if extra:
            problems.append(f"{folder / part}: wheels not in the list: {', '.join(sorted(extra))} (two versions of a "
                            "package stop the install; remove them)")
        carried.update({(part, n): v for n, v in found.items()})
    for part in parts:
        have = {n: (v, "the node") for n, v in device.items()}
        have.update({n: (v, "the carried wheel") for (p, n), (v, _) in carried.items() if p in ("common", part)})
        for (p, name), (_, requires) in carried.items():
            if p in ("common", part):
                problems += filter(None, (check_requirement(f"part {part}: {name}", line, have, accepted)
                                          for line in requires))
        wheels = sizes.get("common", 0) + sizes.get(part, 0)
        total = wheels + tree_size()
        print(f"part {part}: wheels {wheels / 2**20:.1f} MiB + working tree {(total - wheels) / 2**20:.1f} MiB = "
              f"{total / 2**20:.1f} MiB (limit {CARRY_LIMIT / 2**20:.0f} MiB)")
        if total > CARRY_LIMIT:
            problems.append(f"part {part}: {total / 2**20:.1f} MiB to carry, over the 64 MiB of a device call")
    everything = {n: (v, "the node") for n, v in device.items()}
    everything.update({n: (v, "the carried wheel") for (_, n), (v, _) in carried.items()})
    problems += filter(None, (check_requirement("sfn-train", line, everything, accepted)
                              for line in project_requirements()))
    unique = sorted(set(problems), key=problems.index)
    return [p for p in unique if not p.startswith("unverified:")] + [p for p in unique if p.startswith("unverified:")]


def tree_size() -> int:
    """Bytes of the working tree a device call sends (tracked + untracked, not ignored)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum((REPO / f).stat().st_size for f in out.decode().split("\0") if f and (REPO / f).is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/gpu_check/wheels.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--folder", default=str(REPO / ".whl"), help="the prepared wheels (default .whl)")
    args = parser.parse_args(argv)
    found = check_wheels(Path(args.folder))
    problems = [p for p in found if not p.startswith("unverified:")]
    for p in found:
        print(p if p.startswith("unverified:") else f"problem: {p}")
    unverified = len(found) - len(problems)
    print(f"wheels: {'OK' if not problems else f'{len(problems)} problem(s)'}; {unverified} requirement(s) unverified "
          "here (the node's env step checks them first)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
