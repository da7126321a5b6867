#!/usr/bin/env python
"""Time equalize (cle, no I/O) against ``onnx.load`` of the same model, in one process, and
measure the fraction of weight elements it moves (issue 14, Done-when 3 and 5).

Per round, interleaved so both share the machine's noise: ``onnx.load(model)`` (the
baseline), then :class:`~graphteleport.passes.equalize.EqualizePass` on a fresh in-memory
copy of the loaded model (clip split, analysis, the balance's Newton-CG solve, rewrite, the
report's figures; no file read or written).  Medians and their ratio are printed, with the
pass's own phases.  The default model is the cached ResNet-50 of ``bench_teleport.py``.

With ``--peer`` (default: ``$GT_QUANT_PEERS/aimet``, ``/work/peers/aimet`` when unset) the
peer's CLE runs in the same rounds: a worker in the peer's own venv (its python, started
once) loads the same file, and per round, after ours, copies the loaded proto (untimed) and
times only ``aimet_onnx.cross_layer_equalization.equalize_model`` on it (no I/O); the
medians' ratio ours/AIMET is printed, wall and CPU (``process_time``, each process its
own).  ``--peer none`` leaves it out; a peer venv that is missing or cannot load the model
is reported as such, in one line.

``--fractions`` instead prints, for ResNet-50 and torchvision's MobileNetV2 (built from
``models.architectures.mobilenetv2``, randomised, exported by dynamo with BN folded, its
ReLU6s as ``Clip(0, 6)``), the fraction of the quantized weights' elements cle moves, in
absorb and insert mode, with the Clips rewritten (the default) and kept (``--keep-clips``).

Usage (from the repository root, in the project's venv)::

    python bench/bench_equalize.py               # ResNet-50, 3 rounds
    python bench/bench_equalize.py --model m.onnx -n 5 --p 4
    python bench/bench_equalize.py --peer none   # without AIMET's CLE
    python bench/bench_equalize.py --profile     # also CPU per phase
    python bench/bench_equalize.py --floor       # also a bare read and read+write pass
    python bench/bench_equalize.py --fractions
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_canonical import Phases, solved  # noqa: E402

from graphteleport import parallel  # noqa: E402
from graphteleport.analysis import analyze_model  # noqa: E402
from graphteleport.clips import split_clips  # noqa: E402
from graphteleport.orbit import stored_arrays  # noqa: E402
from graphteleport.passes.equalize import (  # noqa: E402
    DEFAULT_P,
    EqualizePass,
    EqualizeResult,
    FiguresObserver,
    balance_terms,
    figures_of,
    one_sided_pairs,
)
from graphteleport.passes.teleport import apply_values  # noqa: E402
from graphteleport.rewrite import observed  # noqa: E402


def equalize(proto: onnx.ModelProto, **kwargs: object) -> tuple[float, EqualizeResult]:
    """One equalize of a fresh in-memory copy of ``proto``: its time and result."""
    model = ir.serde.deserialize_model(proto)
    t = time.perf_counter()
    result = EqualizePass(**kwargs)(model)  # type: ignore[arg-type]
    return time.perf_counter() - t, result


def one_round(path: Path, p: float) -> tuple[tuple[float, float, float, float], EqualizeResult]:
    """One ``onnx.load`` and one equalize of its result: (load wall, equalize wall, load
    CPU, equalize CPU) and the result."""
    t0, c0 = time.perf_counter(), time.process_time()
    proto = onnx.load(path)
    load, load_cpu = time.perf_counter() - t0, time.process_time() - c0
    model = ir.serde.deserialize_model(proto)
    t1, c1 = time.perf_counter(), time.process_time()
    result = EqualizePass(p=p)(model)
    times = (load, time.perf_counter() - t1, load_cpu, time.process_time() - c1)
    return times, result


#: The peer's worker (run by the peer venv's python, the model's path as its argument):
#: loads the model once, then per line on stdin times ``equalize_model`` on a fresh copy.
PEER_WORKER = """
import sys, time, onnx
from aimet_onnx.cross_layer_equalization import equalize_model
src = onnx.load(sys.argv[1])
print("ready", flush=True)
for _ in sys.stdin:
    model = onnx.ModelProto()
    model.CopyFrom(src)
    t, c = time.perf_counter(), time.process_time()
    equalize_model(model)
    print("time", time.perf_counter() - t, time.process_time() - c, flush=True)
"""


class Peer:
    """AIMET-ONNX's CLE in a worker process of its own venv (:data:`PEER_WORKER`)."""

    def __init__(self, python: Path, model: Path) -> None:
        self.proc = subprocess.Popen(
            [str(python), "-c", PEER_WORKER, str(model)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.expect("ready")

    def expect(self, word: str) -> list[str]:
        """The next stdout line that starts with ``word``, split (RuntimeError at EOF)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(word):
                return line.split()
        raise RuntimeError(f"the peer's worker stopped (exit {self.proc.wait()})")

    def one_round(self) -> tuple[float, float]:
        """One timed ``equalize_model`` of a fresh copy: wall and CPU seconds."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        _, wall, cpu = self.expect("time")
        return float(wall), float(cpu)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()


def start_peer(venv: str, model: Path) -> Peer | str:
    """The peer's worker, or a line saying why it could not start."""
    python = Path(venv) / "bin" / "python"
    if not python.exists():
        return f"no python at {python}"
    try:
        return Peer(python, model)
    except RuntimeError as e:
        return f"{python} could not import aimet_onnx or load {model}: {e}"


def profile_equalize(path: Path, rounds: int, p: float) -> str:
    """cle's phases, each timed alone in the pass's order on a fresh copy of the loaded
    model: the clip split, the analysis, reading the tensors, one-sided pairs, ``Q``, the
    solve's kernel, rank-one start and Newton steps, the rewrite and the figures."""
    phases = Phases()
    for _ in range(rounds):
        model = ir.serde.deserialize_model(onnx.load(path))
        phases.start()
        phases.run("clips", split_clips, model)
        analysis = phases.run("analyze", analyze_model, model, {})
        arrays = phases.run("read tensors", stored_arrays, analysis, True)  # (consumed)
        hold = phases.run("one-sided", one_sided_pairs, analysis, arrays)
        terms = phases.run("Q", balance_terms, analysis, p, arrays, hold=hold)
        values = solved(phases, terms)
        observer = FiguresObserver(analysis)  # (as the pass: the figures gathered there)
        with observed(observer):
            tau, *_ = phases.run(
                "rewrite", apply_values, model, analysis, values, arrays=arrays, consume=True
            )
        fields = {"method": "cle", "p": p, "exact": False, "alpha": None}
        fields |= {"objective_before": 0.0, "objective_after": 0.0, "iterations": 0}
        seen = observer.seen()
        fields["gradient"] = 0.0
        phases.run("figures", figures_of, analysis, arrays, values, tau, seen, **fields)
        del model, analysis, arrays, terms  # freed before the next round, as after a pass
    return phases.line()


def floor_round(proto: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """The floor passes of one round over the model's float initializers (wall, CPU):
    reading them out of their protos (what ``stored_arrays`` does), one read of every
    element (``max``: a vectorised reduction, memory-bound), and one read and write
    (``W · s`` into fresh arrays, kept to the end of the round as a rewritten model
    keeps them): the least any pass that rescales every weight does."""
    model = ir.serde.deserialize_model(proto)
    out: dict[str, tuple[float, float]] = {}
    t, c = time.perf_counter(), time.process_time()
    arrays = [
        v.const_value.numpy()
        for v in model.graph.initializers.values()
        if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT
    ]
    out["read out of protos"] = (time.perf_counter() - t, time.process_time() - c)
    t, c = time.perf_counter(), time.process_time()
    for w in arrays:
        w.max(initial=0.0)
    out["read pass"] = (time.perf_counter() - t, time.process_time() - c)
    t, c = time.perf_counter(), time.process_time()
    kept = [np.multiply(w, np.float32(1.0001)) for w in arrays]
    out["read+write pass"] = (time.perf_counter() - t, time.process_time() - c)
    del kept
    return out


def floor_lines(rounds: list[dict[str, tuple[float, float]]], elements: int) -> list[str]:
    """The floor passes' medians, one line each."""
    lines = []
    for name in rounds[0]:
        wall = statistics.median(r[name][0] for r in rounds)
        cpu = statistics.median(r[name][1] for r in rounds)
        lines.append(f"floor          {name}: {wall:.3f} s, CPU {cpu:.3f} s ({elements} elements)")
    return lines


def resnet50() -> Path:
    """The ResNet-50 of ``bench_teleport.py``, exported into its cache on first use."""
    from bench_teleport import DEFAULT_CACHE, ensure_resnet50

    return ensure_resnet50(DEFAULT_CACHE, external_data=False, seed=0)


def mobilenetv2() -> Path:
    """torchvision's MobileNetV2 (random weights, BN statistics randomised), exported by
    dynamo with BN folded into the cache of ``bench_teleport.py`` on first use."""
    from bench_teleport import DEFAULT_CACHE

    path = DEFAULT_CACHE / "mobilenetv2-seed0.onnx"
    if not path.exists():
        from models.architectures import build
        from models.architectures import mobilenetv2 as make
        from models.export import export

        DEFAULT_CACHE.mkdir(parents=True, exist_ok=True)
        model, shape = build(make)
        staging = path.with_suffix(".tmp.onnx")
        export(model, shape, staging, exporter="dynamo", fold_bn=True)
        staging.replace(path)
    return path


def fractions(p: float) -> int:
    """Print the fraction of quantized weight elements cle moves on both models."""
    for name, path in (("MobileNetV2", mobilenetv2()), ("ResNet-50", resnet50())):
        proto = onnx.load(path)
        has_clips = any(n.op_type == "Clip" for n in proto.graph.node)
        for mode in ("absorb", "insert"):
            for clips in (True, False) if has_clips else (True,):
                seconds, result = equalize(proto, p=p, mode=mode, rescale_clip=clips)
                f = result.figures
                assert f is not None
                print(
                    f"{name:12} {mode:6} {'clips split' if clips else 'clips kept ':11} "
                    f"moved {f.moved}/{f.elements} = {f.fraction_moved:.4f}  "
                    f"(all stored: {result.stats.elements_changed}/{result.stats.elements_total}"
                    f"; {len(result.clips.clips)} clips split, "
                    f"{result.inserted.nodes_added} nodes added; {seconds:.1f} s)",
                    flush=True,
                )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an ONNX file (default: cached ResNet-50)")
    parser.add_argument("-n", "--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--p", type=float, default=DEFAULT_P, help="the balance's p")
    parser.add_argument("--fractions", action="store_true", help="Done-when 3's fractions")
    parser.add_argument(
        "--profile", action="store_true", help="also time each phase alone (CPU, medians)"
    )
    default_peer = Path(os.environ.get("GT_QUANT_PEERS", "/work/peers")) / "aimet"
    parser.add_argument(
        "--peer",
        default=str(default_peer),
        help="AIMET-ONNX's venv, or 'none' (default: %(default)s)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also time, each round, a bare read and a read+write pass over the weights",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="graphteleport.parallel's threads (default: the CPUs, at most 2)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        parallel.MAX_WORKERS = max(1, args.threads)
    if args.fractions:
        return fractions(args.p)
    path: Path = args.model or resnet50()
    peer = start_peer(args.peer, path) if args.peer != "none" else "left out (--peer none)"
    rounds: list[tuple[float, float, float, float]] = []
    peers: list[tuple[float, float]] = []
    floors: list[dict[str, tuple[float, float]]] = []
    result: EqualizeResult | None = None
    proto = onnx.load(path) if args.floor else None
    for _ in range(max(args.rounds, 1)):
        result = None  # the last round's model and result freed first, as after a pass
        times, result = one_round(path, args.p)
        rounds.append(times)
        if isinstance(peer, Peer):
            peers.append(peer.one_round())
        if proto is not None:
            floors.append(floor_round(proto))
    if isinstance(peer, Peer):
        peer.close()
    load_s, run_s, load_c, run_c = (statistics.median(r[k] for r in rounds) for k in range(4))
    assert result is not None
    f, m = result.figures, result.minimum
    assert f is not None
    print(f"model          {path}")
    print(f"load average   {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"onnx.load      {load_s:.3f} s, CPU {load_c:.3f} s (medians of {len(rounds)})")
    print(f"equalize cle   {run_s:.3f} s, CPU {run_c:.3f} s (no I/O; p={args.p:g}; ", end="")
    print(
        "last round's phases: " + ", ".join(f"{k} {v:.3f}" for k, v in result.seconds.items()) + ")"
    )
    if m is not None:
        print(f"solve          {m.iterations} Newton / {m.cg_steps} CG steps")
    print(
        f"moved          {f.moved}/{f.elements} quantized weight elements ({f.fraction_moved:.4f})"
    )
    print(f"ratio          {run_s / load_s:.1f}x onnx.load (CPU {run_c / load_c:.1f}x)")
    if peers:
        peer_s = statistics.median(w for w, _ in peers)
        peer_c = statistics.median(c for _, c in peers)
        print(f"AIMET CLE      {peer_s:.3f} s, CPU {peer_c:.3f} s (equalize_model, no I/O)")
        print(f"ours / AIMET   {run_s / peer_s:.2f}x wall, {run_c / peer_c:.2f}x CPU")
    else:
        print(f"AIMET CLE      not run: {peer}")
    for line in floor_lines(floors, result.stats.elements_total) if floors else []:
        print(line)
    print(f"blas           OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    print(
        f"threads        {parallel.workers()} (graphteleport.parallel.workers; --threads sets them)"
    )
    if args.profile:
        print(f"phases         {profile_equalize(path, max(args.rounds, 1), args.p)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
