"""B5: the import time of `import deepmode_async` against importing its dependencies.

Every import runs in a fresh interpreter (`sys.executable -c ...`, working directory the
repository, the parent's environment without coverage or import-time variables). Two
figures a run: the child's own `time.perf_counter()` around the import statement
(printed by the child; the figure the target is about) and the wall time of the whole
child as seen from here (interpreter start-up and shutdown included). Contenders:
- `deps`: `import aiohttp, attrs, cattrs, anyio`, the runtime dependencies of
  pyproject.toml (the script checks that list against pyproject.toml);
- `deepmode_async`: `import deepmode_async` (target: <= 1.25 x `deps`);
- `deepmode_async.testing` and `deepmode_async.cli` (what `deepmode balance` pays at
  every start), extra rows;
- `python -c pass`: the bare interpreter, for the wall-time column.
Each contender runs twice to warm the disk and bytecode caches, then 20 rounds run them
all in turn, the starting one rotating (past 75 s, on a loaded machine, no round starts
after the fifth). Reported: medians, the best run, the ratio of the medians to `deps`
(the target's figure; also the median of the per-round ratios and best against best),
the wall time and the modules loaded. Then `-X importtime` (least self time of 3 runs):
the 10 `deepmode_async` modules with the largest self time, the 10 other modules that
only the SDK loads (not loaded by importing the four dependencies alone), and those the
CLI loads on top of `deepmode_async`. Writes "import_time" into benchmarks/results.json
(not with `--quick`).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from typing import Any, Final

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import machine, store

REPO = pathlib.Path(__file__).resolve().parent.parent
DEPS: Final = ("aiohttp", "attrs", "cattrs", "anyio")
SDK, TESTING, CLI = "deepmode_async", "deepmode_async.testing", "deepmode_async.cli"
DEPS_ROW, BARE_ROW = "deps", "python -c pass"
TARGET, WARM_UP, TOP = 1.25, 2, 10
MIN_ROUNDS, BUDGET_S = 5, 75.0  # on a loaded machine, stop after 5 rounds past 75 s
# Variables that would make the children do more than import: coverage's subprocess
# hook (a1_coverage.pth), import-time profiling, no bytecode cache.
DROPPED_ENV: Final = (
    "COVERAGE_PROCESS_START",
    "PYTHONPROFILEIMPORTTIME",
    "PYTHONDONTWRITEBYTECODE",
)
CHILD = (
    "import sys, time\n"
    "started = time.perf_counter()\n"
    "import {modules}\n"
    "print(time.perf_counter() - started, len(sys.modules))\n"
)
IMPORTTIME = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)\s*$")


class Contender:
    """One import statement in a fresh interpreter; collects both figures per run."""

    def __init__(self, name: str, modules: Sequence[str]) -> None:
        self.name, self.modules = name, tuple(modules)
        self.import_ms: list[float] = []
        self.wall_ms: list[float] = []
        self.loaded = 0

    def code(self) -> str:
        if not self.modules:
            return "pass"
        return CHILD.format(modules=", ".join(self.modules))

    def run(self, record: bool) -> None:
        started = time.perf_counter()
        done = subprocess.run(  # noqa: S603 (this interpreter, our own code)
            [sys.executable, "-c", self.code()],
            cwd=REPO, env=child_env(), capture_output=True, text=True, check=False,
        )  # fmt: skip
        wall = time.perf_counter() - started
        if done.returncode:
            raise RuntimeError(f"{self.name}: exit {done.returncode}\n{done.stderr}")
        if not record:
            return
        self.wall_ms.append(wall * 1000)
        if self.modules:
            seconds, loaded = done.stdout.split()
            self.import_ms.append(float(seconds) * 1000)
            self.loaded = int(loaded)


def child_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in DROPPED_ENV}


def check_dependencies() -> None:
    """DEPS must be pyproject.toml's runtime dependencies (distribution = module names)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0] for spec in project["dependencies"]}
    if names != set(DEPS):
        raise SystemExit(f"pyproject.toml's dependencies are {sorted(names)}, not {DEPS}")


def measure(contenders: list[Contender], rounds: int) -> int:
    """Warm up, then up to `rounds` rounds (fewer past BUDGET_S); returns the rounds run."""
    for contender in contenders:
        for _ in range(WARM_UP):
            contender.run(record=False)
    started = time.perf_counter()
    for round_ in range(rounds):
        start = round_ % len(contenders)
        for contender in contenders[start:] + contenders[:start]:
            contender.run(record=True)
        if round_ + 1 >= MIN_ROUNDS and time.perf_counter() - started > BUDGET_S:
            print(f"(stopped after {round_ + 1} rounds: over {BUDGET_S} s, a loaded machine)")
            return round_ + 1
    return rounds


def import_times(modules: Sequence[str]) -> dict[str, int]:
    """Self time in us of every module one `-X importtime` child loads."""
    done = subprocess.run(  # noqa: S603 (this interpreter, our own code)
        [sys.executable, "-X", "importtime", "-c", f"import {', '.join(modules)}"],
        cwd=REPO, env=child_env(), capture_output=True, text=True, check=True,
    )  # fmt: skip
    selves: dict[str, int] = {}
    for line in done.stderr.splitlines():
        if match := IMPORTTIME.match(line):
            selves[match[4]] = int(match[1])
    return selves


def least_import_times(modules: Sequence[str], runs: int) -> dict[str, int]:
    """Each module's least self time over `runs` children: other load only adds to it."""
    samples = [import_times(modules) for _ in range(runs)]
    names = {name for sample in samples for name in sample}
    return {name: min(s[name] for s in samples if name in s) for name in names}


def top(selves: dict[str, int], keep: set[str] | None = None) -> list[list[Any]]:
    chosen = [(name, us) for name, us in selves.items() if keep is None or name in keep]
    return [[name, us] for name, us in sorted(chosen, key=lambda item: -item[1])[:TOP]]


def print_modules(title: str, rows: list[list[Any]]) -> None:
    total = sum(us for _, us in rows)
    print(f"\n{title} (top {TOP}: {total / 1000:.1f} ms self time)")
    print("| module | self time |\n|---|---|")
    for name, us in rows:
        print(f"| {name} | {us / 1000:.2f} ms |")


def report(contenders: list[Contender], rounds: int, importtime_runs: int) -> dict[str, Any]:
    by_name = {c.name: c for c in contenders}
    medians = {c.name: statistics.median(c.import_ms) for c in contenders if c.modules}
    walls = {c.name: statistics.median(c.wall_ms) for c in contenders}
    deps = medians[DEPS_ROW]
    print(
        f"B5: import time in a fresh interpreter, median of {rounds} rounds "
        f"({machine()})\n"
        "| import | median import | best | vs deps | median wall (whole child) | modules |\n"
        "|---|---|---|---|---|---|"
    )
    for contender in contenders:
        wall = walls[contender.name]
        if not contender.modules:
            print(f"| {contender.name} | - | - | - | {wall:.1f} ms | - |")
            continue
        median = medians[contender.name]
        print(
            f"| {contender.name} | {median:.1f} ms | {min(contender.import_ms):.1f} ms "
            f"| {median / deps:.2f} x | {wall:.1f} ms | {contender.loaded} |"
        )
    ratio = medians[SDK] / deps
    sdk, dep = by_name[SDK].import_ms, by_name[DEPS_ROW].import_ms
    paired = statistics.median(s / d for s, d in zip(sdk, dep, strict=True))
    best = min(sdk) / min(dep)
    verdict = "met" if ratio <= TARGET else "MISSED"
    print(
        f"`import {SDK}`: {ratio:.2f} x the dependencies (target <= {TARGET}): {verdict}; "
        f"median of the per-round ratios {paired:.2f} x, best against best {best:.2f} x"
    )

    deps_selves = least_import_times(DEPS, importtime_runs)
    sdk_selves = least_import_times([SDK], importtime_runs)
    cli_selves = least_import_times([CLI], importtime_runs)
    ours = {name for name in sdk_selves if name == SDK or name.startswith(f"{SDK}.")}
    sdk_only = set(sdk_selves) - set(deps_selves) - ours
    cli_only = set(cli_selves) - set(sdk_selves)
    deepmode_modules = top(sdk_selves, ours)
    sdk_only_modules = top(sdk_selves, sdk_only)
    cli_only_modules = top(cli_selves, cli_only)
    runs = f"-X importtime, least of {importtime_runs} run{'s' * (importtime_runs > 1)}"
    print_modules(f"{SDK} modules, by self time ({runs})", deepmode_modules)
    print_modules(
        f"Other modules only `import {SDK}` loads: {len(sdk_only)} modules, "
        f"{sum(sdk_selves[name] for name in sdk_only) / 1000:.1f} ms self time in all",
        sdk_only_modules,
    )
    print_modules(
        f"Modules `import {CLI}` loads on top of `import {SDK}`: {len(cli_only)} modules, "
        f"{sum(cli_selves[name] for name in cli_only) / 1000:.1f} ms self time in all",
        cli_only_modules,
    )
    return {
        "rounds": rounds,
        "machine": machine(),
        "sdk_ms": round(medians[SDK], 2),
        "deps_ms": round(deps, 2),
        "ratio": round(ratio, 3),
        "paired_ratio": round(paired, 3),
        "best_ratio": round(best, 3),
        "target": TARGET,
        "rows": {name: round(ms, 2) for name, ms in medians.items()},
        "best_ms": {c.name: round(min(c.import_ms), 2) for c in contenders if c.modules},
        "wall_ms": {name: round(ms, 2) for name, ms in walls.items()},
        "modules_loaded": {c.name: c.loaded for c in contenders if c.modules},
        "importtime_runs": importtime_runs,
        "sdk_only_modules": sdk_only_modules,
        "deepmode_modules": deepmode_modules,
        "cli_only_modules": cli_only_modules,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="5 rounds, no results")
    args = parser.parse_args()
    check_dependencies()
    rounds, importtime_runs = (5, 1) if args.quick else (20, 3)
    contenders = [
        Contender(DEPS_ROW, DEPS),
        Contender(SDK, [SDK]),
        Contender(TESTING, [TESTING]),
        Contender(CLI, [CLI]),
        Contender(BARE_ROW, []),
    ]
    rounds = measure(contenders, rounds)
    results = report(contenders, rounds, importtime_runs)
    if not args.quick:
        store("import_time", results)


if __name__ == "__main__":
    main()
