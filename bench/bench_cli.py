#!/usr/bin/env python
"""Time the whole ``graphteleport`` command against ``onnx.load`` + ``onnx.save`` (issue 15,
Done-when 2): fresh processes, imports included, interleaved round by round.

Each round runs, in this order and each in a new interpreter:

* **load+save**: ``python -c "import onnx; onnx.save(onnx.load(M), T)"``;
* **no-verify**: ``python -m graphteleport M -o OUT --no-verify -q``;
* **verify**: ``python -m graphteleport M -o OUT -q`` (the default proof: outputs on 8
  input draws and the per-tensor check).

Outputs are deleted before every command (outside the timing).  The script prints each
command's median wall time over the rounds, its median CPU time (the child's user +
system time, from ``os.wait4``: on a machine other jobs load, CPU time moves less than
wall time, though neither is the quiet figure), its peak resident memory (``ru_maxrss``),
the two ratios against load+save (targets: no-verify ≤ 1.3×, verify ≤ 2.5×) and the
load average before and after, since other jobs on the machine move every figure.
graphteleport runs from this checkout (``PYTHONPATH``), its bytecode compiled first
(``compileall``, as ``pip install`` does for an installed package: with
``PYTHONDONTWRITEBYTECODE`` set, every run would otherwise compile the package's sources
again, about 0.09 s).

Usage (from the repository root, in the project's venv)::

    python bench/bench_cli.py                      # ResNet-50 (bench/.cache), 5 rounds
    python bench/bench_cli.py --rounds 7 --model my.onnx --json out.json
    python bench/bench_cli.py --also ../main         # and main's commands, same rounds

The default model is bench_teleport.py's ResNet-50 (exported and cached there on first
use).  Exit status: 0 done; 1 a command failed; 2 bad usage.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TARGETS = {"no-verify": 1.3, "verify": 2.5}


Command = tuple[list[str], Path]  # argv, the checkout it runs from


def commands(model: Path, work: Path, others: list[Path]) -> dict[str, Command]:
    """The commands, by name (each writes into ``work``): load+save, then no-verify and
    verify from this checkout and from each of ``others`` (named ``...@folder``)."""
    py = sys.executable
    base = f"import onnx; onnx.save(onnx.load({str(model)!r}), {str(work / 'base.onnx')!r})"
    tele = [py, "-m", "graphteleport", str(model), "-o", str(work / "out.onnx"), "-q"]
    out: dict[str, Command] = {"load+save": ([py, "-c", base], REPO)}
    for repo in [REPO, *others]:
        suffix = "" if repo == REPO else f"@{repo.name}"
        out["no-verify" + suffix] = ([*tele, "--no-verify"], repo)
        out["verify" + suffix] = (tele, repo)
    return out


def run_once(argv: list[str], repo: Path, work: Path) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and peak RSS (bytes) of one command run to completion."""
    for f in work.iterdir():
        f.unlink()
    env = {**os.environ, "PYTHONPATH": str(repo)}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=repo, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(argv)}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def measure(model: Path, rounds: int, others: list[Path]) -> dict[str, Any]:
    """Every command once per round, interleaved; medians, peaks and ratios."""
    times: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}
    peaks: dict[str, int] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-cli-", dir=HERE / ".cache") as tmp:
        work = Path(tmp)
        cmds = commands(model, work, others)
        for _ in range(rounds):
            for name, (argv, repo) in cmds.items():
                seconds, cpu, peak = run_once(argv, repo, work)
                times.setdefault(name, []).append(seconds)
                cpus.setdefault(name, []).append(cpu)
                peaks[name] = max(peaks.get(name, 0), peak)
    medians = {k: statistics.median(v) for k, v in times.items()}
    base = medians["load+save"]
    return {
        "model": str(model),
        "rounds": rounds,
        "seconds": times,
        "median": medians,
        "cpu_seconds": cpus,
        "cpu_median": {k: statistics.median(v) for k, v in cpus.items()},
        "peak_rss_bytes": peaks,
        "ratio": {k: medians[k] / base for k in medians if k != "load+save"},
        "targets": TARGETS,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def report(r: dict[str, Any]) -> None:
    print(f"model {r['model']}, {r['rounds']} rounds (whole processes, interleaved)")
    for name, med in r["median"].items():
        spread = ", ".join(f"{s:.2f}" for s in r["seconds"][name])
        peak = r["peak_rss_bytes"][name] / 2**30
        cpu = r["cpu_median"][name]
        print(
            f"  {name:10s} median {med:6.2f} s  cpu {cpu:5.2f} s  peak {peak:.2f} GiB  ({spread})"
        )
    for name, ratio in r["ratio"].items():
        target = TARGETS[name.split("@")[0]]
        verdict = "meets" if ratio <= target else "misses"
        print(f"  {name}: {ratio:.2f}x load+save ({verdict} the {target}x target)")
    before = " ".join(f"{x:.2f}" for x in r["loadavg_before"])
    after = " ".join(f"{x:.2f}" for x in r["loadavg_after"])
    print(f"  load average before {before}, after {after} ({os.cpu_count()} CPUs)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="ONNX model (default: the cached ResNet-50)")
    p.add_argument("--rounds", type=int, default=5, help="rounds (median over them; >= 1)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument(
        "--also",
        type=Path,
        action="append",
        default=[],
        metavar="CHECKOUT",
        help="also time the commands of another graphteleport checkout (e.g. main's) in "
        "the same rounds",
    )
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    model = args.model
    if model is None:
        sys.path.insert(0, str(HERE))
        from bench_teleport import DEFAULT_CACHE, ensure_resnet50

        model = ensure_resnet50(DEFAULT_CACHE, external_data=False, seed=0)
    (HERE / ".cache").mkdir(exist_ok=True)
    others = [o.resolve() for o in args.also]
    for repo in [REPO, *others]:
        package = str(repo / "graphteleport")
        subprocess.run([sys.executable, "-m", "compileall", "-q", package], check=True)
    r = measure(model.resolve(), args.rounds, others)
    report(r)
    if args.json is not None:
        args.json.write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
