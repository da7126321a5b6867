#!/usr/bin/env python
"""Time the CLI's teleport against ``onnx.load`` + ``onnx.save`` of the same model.

Both are measured in the same process, interleaved round by round so they share the
machine's noise, and the medians are compared:

* **baseline**: ``onnx.load(model)`` then ``onnx.save(proto, tmp)`` (with external data
  when the model is benchmarked with external data);
* **teleport**: ``graphteleport.pipeline.teleport_file(model, out, --no-verify)``, the
  call the CLI makes, timed whole; its phases (load, inputs, analyze, rewrite, report,
  save) are the ones the pipeline records in its report (``report.seconds``), and
  ``other`` is the rest of the wall time;
* with ``--commands``, both as commands in fresh interpreters (imports included):
  ``python -c "onnx.save(onnx.load(...))"`` against ``graphteleport ... --no-verify``.

Once after the rounds, a verified ``teleport_file`` (the CLI's default proof) gives the
verification's time and result.  The default model is a ResNet-50 (Hugging Face
``ResNetForImageClassification`` with 1000 classes, 25.6 M parameters, about 100 MB of
float32 weights) with re-randomised BatchNorm statistics, exported once with the dynamo
exporter and cached.  Peak memory (``VmHWM``, the process's own ``ru_maxrss``) of one
baseline and one teleport is measured in fresh subprocesses, and one extra teleport is
profiled (cProfile, or pyinstrument) to show where its time goes.

Usage (from the repository root, in the project's venv)::

    python bench/bench_teleport.py                      # ResNet-50, inline weights
    python bench/bench_teleport.py --external-data      # the same, weights in a .data file
    python bench/bench_teleport.py --model my.onnx --input-shape x=1,3,224,224
    python bench/bench_teleport.py --json out.json --max-ratio 2

Exit status: 0 done; 1 the verification failed; 2 bad usage; 3 ``--max-ratio`` exceeded.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # this checkout's graphteleport, also where another is installed
DEFAULT_CACHE = HERE / ".cache"
RESNET_INPUT = (1, 3, 224, 224)
#: onnx_ir's (hence graphteleport's) external-data threshold; the baseline uses the same.
EXTERNAL_THRESHOLD = 256
BASELINE_PHASES = ("load", "save")
#: The pipeline's own phases (``TeleportReport.seconds``), and what the wall time has beyond.
TELEPORT_PHASES = ("load", "inputs", "analyze", "rewrite", "report", "save", "other")

Times = dict[str, float]


# --------------------------------------------------------------------------- the model


def resnet50_path(cache: Path, external_data: bool, seed: int) -> Path:
    """Where the cached ResNet-50 export lives (its ``.data`` file beside it, if any)."""
    return cache / f"resnet50-seed{seed}{'-ext' if external_data else ''}.onnx"


def ensure_resnet50(cache: Path, external_data: bool, seed: int) -> Path:
    """Export the ResNet-50 into *cache* unless it is already there; return its path.

    The export goes to a private directory first and is moved into place (data file
    first, model last), so an interrupted export is never reused.
    """
    path = resnet50_path(cache, external_data, seed)
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=cache))
    try:
        print(f"exporting ResNet-50 to {path} (once; reused afterwards) ...", flush=True)
        t0 = time.perf_counter()
        export_resnet50(staging / path.name, external_data, seed)
        data = staging / f"{path.name}.data"
        if data.exists():
            os.replace(data, cache / data.name)
        os.replace(staging / path.name, path)
        print(f"  exported in {time.perf_counter() - t0:.1f}s", flush=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def export_resnet50(path: Path, external_data: bool, seed: int) -> None:
    """Export a randomly initialised ResNet-50 (eval mode, random BN statistics)."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # ResNetConfig() is the ResNet-50 layout; num_labels=1000 gives it the ImageNet
        # head (2048x1000) and so its usual 25.6 M parameters (the default is 2 labels).
        config = ResNetConfig()
        config.num_labels = 1000
        model = ResNetForImageClassification(config).eval()
        randomize_batchnorm(model, seed)
        x = torch.randn(RESNET_INPUT)
    with quiet():
        torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=external_data)


def randomize_batchnorm(model: Any, seed: int) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters, in place.

    Fresh BatchNorms are the identity (mean 0, var 1, weight 1, bias 0), which a
    Conv+BN fold would leave untouched; these draws match ``models.architectures``:
    weight ~ U[0.5, 1.5], bias ~ N(0, 0.1²), mean ~ N(0, 0.5²), var ~ U[0.5, 2].
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                continue
            fills = {
                "weight": lambda shape: torch.rand(shape, generator=gen) + 0.5,
                "bias": lambda shape: torch.randn(shape, generator=gen) * 0.1,
                "running_mean": lambda shape: torch.randn(shape, generator=gen) * 0.5,
                "running_var": lambda shape: torch.rand(shape, generator=gen) * 1.5 + 0.5,
            }
            for name, fill in fills.items():
                tensor = getattr(m, name, None)
                if isinstance(tensor, torch.Tensor):
                    tensor.copy_(fill(tensor.shape))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporter's progress prints and warnings."""
    buffer = io.StringIO()
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(buffer),
        contextlib.redirect_stderr(buffer),
    ):
        warnings.simplefilter("ignore")
        try:
            yield
        except Exception as err:
            if hasattr(err, "add_note") and buffer.getvalue().strip():
                err.add_note("exporter output:\n" + buffer.getvalue()[-4000:])
            raise


def model_files(path: Path) -> list[Path]:
    """The model file and the external data files it references."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    return [path, *sorted(path.parent / loc for loc in locations)]


def describe_model(path: Path) -> dict[str, Any]:
    """Sizes and counts of the benchmarked model, for the report."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    files = model_files(path)
    external = len(files) > 1
    return {
        "path": str(path),
        "bytes": sum(f.stat().st_size for f in files),
        "files": [str(f) for f in files],
        "external_data": external,
        "nodes": len(proto.graph.node),
        "initializers": len(proto.graph.initializer),
        "inputs": [i.name for i in proto.graph.input],
        "outputs": [o.name for o in proto.graph.output],
    }


# --------------------------------------------------------------------------- measurements


def remove_outputs(dst: Path) -> None:
    """Delete a previous round's output (and its data file) so every round starts alike."""
    for p in (dst, dst.with_name(f"{dst.name}.data")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def baseline_once(src: Path, dst: Path, external_data: bool) -> Times:
    """``onnx.load`` + ``onnx.save``: the floor any ONNX-to-ONNX tool pays."""
    import onnx

    t0 = time.perf_counter()
    proto = onnx.load(str(src))  # loads external data too, like the teleport must
    t1 = time.perf_counter()
    if external_data:
        onnx.save(
            proto,
            str(dst),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{dst.name}.data",
            size_threshold=EXTERNAL_THRESHOLD,
        )
    else:
        onnx.save(proto, str(dst))
    t2 = time.perf_counter()
    return {"load": t1 - t0, "save": t2 - t1, "total": t2 - t0}


def options(args: argparse.Namespace, verify: bool) -> Any:
    """The CLI's options for ``graphteleport SRC -o DST --seed SEED [--no-verify]``."""
    from graphteleport.pipeline import TeleportOptions

    shapes = {k: tuple(v) for k, v in args.input_shape}
    return TeleportOptions(seed=args.seed, verify=verify, input_shapes=shapes)


def teleport_once(src: Path, dst: Path, args: argparse.Namespace) -> tuple[Times, Any]:
    """``teleport_file(SRC, DST, --no-verify)``, the call the CLI makes, timed whole.

    The phases are the pipeline's own (``report.seconds``); ``other`` is what the
    wall time has beyond them (path checks, the pass's bookkeeping).
    """
    from graphteleport.pipeline import teleport_file

    opts = options(args, verify=False)
    t0 = time.perf_counter()
    report = teleport_file(src, dst, opts)
    wall = time.perf_counter() - t0
    times = {k: float(report.seconds.get(k, 0.0)) for k in TELEPORT_PHASES if k != "other"}
    times["other"] = wall - sum(times.values())
    times["total"] = wall
    return times, report


def verified_once(src: Path, dst: Path, args: argparse.Namespace) -> Any:
    """``teleport_file`` with the CLI's default verification; its report."""
    from graphteleport.pipeline import teleport_file

    return teleport_file(src, dst, options(args, verify=True))


def command_once(argv: Sequence[str]) -> float:
    """Wall time of a command in a fresh interpreter (start-up and imports included)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's graphteleport
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *argv], check=True, capture_output=True, env=env)
    return time.perf_counter() - t0


def commands(src: Path, dst_base: Path, dst_tele: Path) -> dict[str, list[str]]:
    """The two sides as commands: a one-line onnx.load + onnx.save, and the CLI."""
    save = f"import onnx; onnx.save(onnx.load({str(src)!r}), {str(dst_base)!r})"
    return {
        "baseline": ["-c", save],
        "teleport": ["-m", "graphteleport", str(src), "-o", str(dst_tele), "--no-verify", "-q"],
    }


def settle() -> None:
    """Collect garbage so one measurement does not pay for the previous one's."""
    gc.collect()


# --------------------------------------------------------------------------- memory probes


def maxrss_bytes() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in bytes (it is KiB on Linux, bytes on macOS).

    Beware: on Linux a freshly started process inherits its parent's high-water mark
    through fork+exec, so in a child of a big process this is at least the parent's
    peak.  :func:`peak_rss_bytes` does not have that problem.
    """
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's own peak RSS: ``VmHWM`` on Linux (ru_maxrss elsewhere)."""
    peak = _proc_status_kib("VmHWM")
    return maxrss_bytes() if peak is None else peak


def current_rss_bytes() -> int | None:
    """This process's resident set size now (``VmRSS``; None where /proc is missing)."""
    return _proc_status_kib("VmRSS")


def probe(kind: str, src: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run in a fresh process (``--probe``): import, then one measurement; report peaks."""
    t0 = time.perf_counter()
    if kind == "baseline":
        import onnx  # noqa: F401
    else:
        import graphteleport.pipeline  # noqa: F401
    out: dict[str, Any] = {"import_s": time.perf_counter() - t0}
    gc.collect()
    out["rss_after_import"] = current_rss_bytes() or peak_rss_bytes()
    out["peak_after_import"] = peak_rss_bytes()
    dst = work / f"probe-{kind}.onnx"
    if kind == "baseline":
        out["times"] = baseline_once(src, dst, args.external_data)
        out["peak_after_run"] = peak_rss_bytes()
    else:
        out["times"], _ = teleport_once(src, dst, args)
        out["peak_after_run"] = peak_rss_bytes()
        remove_outputs(dst)
        gc.collect()
        out["verify_s"] = verified_once(src, dst, args).seconds["verify"]
        out["peak_after_verify"] = peak_rss_bytes()
    out["ru_maxrss"] = maxrss_bytes()  # inflated by the parent's peak on Linux; see above
    remove_outputs(dst)
    return out


def run_probe(kind: str, src: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start ``--probe KIND`` in a fresh interpreter and return its JSON answer."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--model",
        str(src),
        "--probe",
        kind,
        "--work-dir",
        str(work),
        "--seed",
        str(args.seed),
    ]
    if args.external_data:
        cmd.append("--external-data")
    for name, dims in args.input_shape:
        cmd += ["--input-shape", f"{name}={','.join(map(str, dims))}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {kind} failed:\n{proc.stderr[-4000:]}")
    answer: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return answer


# --------------------------------------------------------------------------- profiling


def profile_teleport(src: Path, dst: Path, args: argparse.Namespace, top: int) -> dict[str, Any]:
    """Profile one teleport (no verification); return the hotspots, save the raw profile."""
    if args.profiler == "pyinstrument":
        return _pyinstrument(src, dst, args)
    prof = cProfile.Profile()
    settle()
    prof.enable()
    teleport_once(src, dst, args)
    prof.disable()
    remove_outputs(dst)
    out_path = args.profile_out or (args.cache_dir / "teleport.prof")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    prof.dump_stats(str(out_path))
    stats = pstats.Stats(prof)
    entries = []
    total = 0.0
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in raw.items():
        entries.append(
            {
                "function": f"{_short(filename)}:{line}({func})",
                "calls": ncalls,
                "self_s": tottime,
                "cum_s": cumtime,
                "graphteleport": f"{os.sep}graphteleport{os.sep}" in filename,
            }
        )
        total += tottime
    by_self = sorted(entries, key=lambda e: -e["self_s"])[:top]
    ours = sorted((e for e in entries if e["graphteleport"]), key=lambda e: -e["cum_s"])[:top]
    return {
        "profiler": "cProfile",
        "file": str(out_path),
        "total_s": total,
        "top_self": by_self,
        "top_graphteleport_cumulative": ours,
    }


def _pyinstrument(src: Path, dst: Path, args: argparse.Namespace) -> dict[str, Any]:
    try:
        from pyinstrument import Profiler
    except ImportError as e:
        raise SystemExit(
            "bench_teleport: --profiler pyinstrument needs `pip install pyinstrument`"
        ) from e
    profiler = Profiler(interval=0.001)
    settle()
    profiler.start()
    teleport_once(src, dst, args)
    profiler.stop()
    remove_outputs(dst)
    out_path = args.profile_out or (args.cache_dir / "teleport.html")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(profiler.output_html())
    return {
        "profiler": "pyinstrument",
        "file": str(out_path),
        "text": profiler.output_text(unicode=False, color=False),
    }


def _short(filename: str) -> str:
    """A profile entry's file, relative to the package directory it lives in."""
    for marker in (f"{os.sep}graphteleport{os.sep}", f"{os.sep}site-packages{os.sep}"):
        if marker in filename:
            tail = filename.split(marker, 1)[1]
            return ("graphteleport/" if "graphteleport" in marker else "") + tail
    return filename


# --------------------------------------------------------------------------- reporting


def summarise(samples: Sequence[Times]) -> dict[str, dict[str, float]]:
    """Median, min and max of every key over the rounds."""
    keys = list(samples[0])
    return {
        k: {
            "median": statistics.median(s[k] for s in samples),
            "min": min(s[k] for s in samples),
            "max": max(s[k] for s in samples),
        }
        for k in keys
    }


def print_table(results: dict[str, Any]) -> None:
    m = results["model"]
    med = results["medians"]
    storage = "external data" if m["external_data"] else "inline weights"
    print(
        f"\nmodel: {m['path']} ({m['bytes'] / 1e6:.1f} MB, {storage}, {m['nodes']} nodes, "
        f"{m['initializers']} initializers)"
    )
    print(
        f"rounds: {results['config']['repeat']} (+{results['config']['warmup']} warm-up), "
        "interleaved; seconds: median [min, max]\n"
    )

    def row(group: str, name: str, s: dict[str, float]) -> None:
        print(f"  {group:<9}{name:<34}{s['median']:8.3f}   [{s['min']:.3f}, {s['max']:.3f}]")

    for k in (*BASELINE_PHASES, "total"):
        name = f"onnx.{k}" if k != "total" else "total"
        row("baseline" if k == "load" else "", name, med["baseline"][k])
    print()
    for k in (*TELEPORT_PHASES, "total"):
        name = {"other": "other (wall - phases)", "total": "total: teleport_file()"}.get(k, k)
        row("teleport" if k == "load" else "", name, med["teleport"][k])
    if "commands" in med:
        print()
        row("commands", "python -c 'onnx load + save'", med["commands"]["baseline"])
        row("", "graphteleport --no-verify", med["commands"]["teleport"])
    r = results["ratios"]
    target = results["config"]["max_ratio"]
    print(
        f"\nteleport / baseline: {r['teleport']:.2f}x"
        + (f"  (target <= {target:g})" if target is not None else "")
        + f"  (of the fastest rounds: {results['ratios_of_minima']['teleport']:.2f}x)"
    )
    if "commands" in r:
        print(f"commands / baseline: {r['commands']:.2f}x  (fresh interpreters, imports included)")
    tel = med["teleport"]
    shares = ", ".join(
        f"{k} {100 * tel[k]['median'] / tel['total']['median']:.0f}%" for k in TELEPORT_PHASES
    )
    print(f"teleport phases: {shares}")
    v = results["verification"]
    print(
        f"verified teleport_file (the CLI's default, once): verify {v['seconds']:.3f}s of "
        f"{v['total_s']:.3f}s; {v['summary']}"
    )
    t = results["teleport"]
    print(
        f"free cofactors {t['free_cofactors']}, weights changed "
        f"{t['weights_changed']}/{t['weights_total']}"
    )
    print_memory(results)
    print_profile(results.get("profile"))


def print_memory(results: dict[str, Any]) -> None:
    mem = results.get("memory")
    if mem:
        print(
            "\npeak RSS (VmHWM, i.e. ru_maxrss of the process itself; each in a fresh "
            "process; 'above imports' = peak minus the RSS after imports):"
        )
        for name, p in mem.items():
            if "error" in p:
                print(f"  {name:<9} probe failed: {p['error'].splitlines()[-1]}")
                continue
            base = p["rss_after_import"]
            line = (
                f"  {name:<9} peak {p['peak_after_run'] / 2**20:7.0f} MiB, above imports "
                f"{(p['peak_after_run'] - base) / 2**20:6.0f} MiB; imports "
                f"{p['import_s']:.2f}s, {base / 2**20:.0f} MiB"
            )
            if "peak_after_verify" in p:
                line += f"; with verify peak {p['peak_after_verify'] / 2**20:.0f} MiB"
            print(line)
        if "ratio" in results.get("memory_ratios", {}):
            print(
                f"  teleport / baseline peak above imports: "
                f"{results['memory_ratios']['ratio']:.2f}x"
            )
    print(f"this process's peak RSS (all rounds): {results['process_peak_rss'] / 2**20:.0f} MiB")


def print_profile(prof: dict[str, Any] | None) -> None:
    if not prof:
        return
    print(f"\nprofile of one teleport ({prof['profiler']}, raw profile: {prof['file']})")
    if "text" in prof:
        print(prof["text"])
        return
    total = prof["total_s"]
    print(f"  top by own time (of {total:.3f}s profiled):")
    for e in prof["top_self"]:
        print(
            f"    {100 * e['self_s'] / total:5.1f}%  {e['self_s']:7.3f}s  "
            f"{e['calls']:>8}  {e['function']}"
        )
    print("  graphteleport functions by cumulative time:")
    for e in prof["top_graphteleport_cumulative"]:
        print(
            f"    {100 * e['cum_s'] / total:5.1f}%  {e['cum_s']:7.3f}s  "
            f"{e['calls']:>8}  {e['function']}"
        )


# --------------------------------------------------------------------------- main


def _shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.split(",")) if dims else ()
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected NAME=D1,D2,..., got {text!r}") from e
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=D1,D2,..., got {text!r}")
    return name, shape


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench_teleport.py",
        description="Time graphteleport's teleport against onnx.load + onnx.save of the "
        "same model, in the same run, and print the ratio.",
    )
    p.add_argument(
        "--model",
        type=Path,
        help="an ONNX file to bench (default: a ResNet-50, exported once into the cache directory)",
    )
    p.add_argument(
        "--external-data",
        action="store_true",
        help="export the ResNet-50 with its weights in a .data file, and save both "
        "outputs with external data (with --model: save the baseline's output that "
        "way; graphteleport keeps external data when the input has it)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE,
        help=f"where the exported model is kept (default {DEFAULT_CACHE})",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where outputs are written (default: a temporary directory in the "
        "cache directory, deleted afterwards)",
    )
    p.add_argument("-n", "--repeat", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed rounds first (page cache, lazy imports; default 1)",
    )
    p.add_argument("--seed", type=int, default=0, help="teleport seed, as the CLI's --seed")
    p.add_argument(
        "--input-shape",
        type=_shape,
        action="append",
        default=[],
        metavar="NAME=DIMS",
        help="as the CLI's --input-shape (repeatable)",
    )
    p.add_argument(
        "--commands",
        action="store_true",
        help="also time both sides as commands in fresh interpreters each round "
        "(python -c 'onnx.load + onnx.save' against graphteleport --no-verify)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument(
        "--profiler",
        choices=("cprofile", "pyinstrument", "none"),
        default="cprofile",
        help="profile one extra teleport (default cprofile)",
    )
    p.add_argument(
        "--profile-out",
        type=Path,
        default=None,
        help="raw profile file (default: CACHE/teleport.prof or .html)",
    )
    p.add_argument("--top", type=int, default=20, help="hotspots to list (default 20)")
    p.add_argument(
        "--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON"
    )
    p.add_argument(
        "--max-ratio",
        type=float,
        default=None,
        metavar="X",
        help="exit 3 if teleport/baseline exceeds X",
    )
    p.add_argument("--probe", choices=("baseline", "teleport"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0:
        p.error("--repeat must be >= 1 and --warmup >= 0")
    if args.model is not None and not args.model.is_file():
        p.error(f"model file not found: {args.model}")
    return args


@contextlib.contextmanager
def work_dir(args: argparse.Namespace) -> Iterator[Path]:
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        yield args.work_dir
        return
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bench-", dir=args.cache_dir) as d:
        yield Path(d)


def timed_rounds(
    src: Path, work: Path, args: argparse.Namespace
) -> tuple[dict[str, list[Times]], Any]:
    """Warm-up and timed rounds; the order of baseline and teleport alternates."""
    samples: dict[str, list[Times]] = {"baseline": [], "teleport": []}
    if args.commands:
        samples["commands"] = []
    report: Any = None
    dst_base, dst_tele = work / "baseline.onnx", work / "teleport.onnx"
    argv = commands(src, dst_base, dst_tele)

    def baseline() -> Times:
        t = baseline_once(src, dst_base, args.external_data)
        remove_outputs(dst_base)
        return t

    def teleport() -> Times:
        nonlocal report
        t, report = teleport_once(src, dst_tele, args)
        remove_outputs(dst_tele)
        return t

    def command() -> Times:
        t = {}
        for side, dst in (("baseline", dst_base), ("teleport", dst_tele)):
            settle()
            t[side] = command_once(argv[side])
            remove_outputs(dst)
        return t

    for i in range(args.warmup + args.repeat):
        timed = i >= args.warmup
        label = f"round {i - args.warmup + 1}/{args.repeat}" if timed else f"warm-up {i + 1}"
        steps: list[tuple[str, Callable[[], Times]]] = [
            ("baseline", baseline),
            ("teleport", teleport),
        ]
        if i % 2:
            steps.reverse()
        if args.commands:
            steps.append(("commands", command))
        got: dict[str, Times] = {}
        for name, fn in steps:
            settle()
            got[name] = fn()
        settle()
        print(
            f"  {label}: baseline {got['baseline']['total']:.3f}s, teleport "
            f"{got['teleport']['total']:.3f}s"
            + (
                f", commands {got['commands']['baseline']:.3f}s / "
                f"{got['commands']['teleport']:.3f}s"
                if "commands" in got
                else ""
            ),
            flush=True,
        )
        if timed:
            for name, t in got.items():
                samples[name].append(t)
    return samples, report


def versions() -> dict[str, str]:
    out = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": str(os.cpu_count()),
    }
    for mod in (
        "numpy",
        "onnx",
        "onnx_ir",
        "onnxruntime",
        "google.protobuf",
        "networkx",
        "graphteleport",
    ):
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[mod] = str(getattr(m, "__version__", "?"))
        except ImportError:
            out[mod] = "missing"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        with work_dir(args) as work:
            print(json.dumps(probe(args.probe, args.model, work, args)))
        return 0

    src = args.model or ensure_resnet50(args.cache_dir, args.external_data, args.seed)
    model = describe_model(src)
    print(
        f"benchmarking {src} ({model['bytes'] / 1e6:.1f} MB"
        f"{', external data' if model['external_data'] else ''})",
        flush=True,
    )
    with work_dir(args) as work:
        samples, report = timed_rounds(src, work, args)
        settle()
        verified = verified_once(src, work / "verified.onnx", args)
        remove_outputs(work / "verified.onnx")
        memory: dict[str, Any] = {}
        if not args.no_memory:
            for kind in ("baseline", "teleport"):
                try:
                    memory[kind] = run_probe(kind, src, work, args)
                except RuntimeError as e:
                    memory[kind] = {"error": str(e)}
        profile = None
        if args.profiler != "none":
            profile = profile_teleport(src, work / "profiled.onnx", args, args.top)

    medians = {k: summarise(v) for k, v in samples.items()}
    base = medians["baseline"]["total"]
    ratios = {"teleport": medians["teleport"]["total"]["median"] / base["median"]}
    ratios_of_minima = {"teleport": medians["teleport"]["total"]["min"] / base["min"]}
    if "commands" in medians:
        cmd = medians["commands"]
        ratios["commands"] = cmd["teleport"]["median"] / cmd["baseline"]["median"]
        ratios_of_minima["commands"] = cmd["teleport"]["min"] / cmd["baseline"]["min"]
    v = verified.verification
    results: dict[str, Any] = {
        "config": {
            "repeat": args.repeat,
            "warmup": args.warmup,
            "seed": args.seed,
            "external_data": args.external_data,
            "max_ratio": args.max_ratio,
            "input_shapes": {k: list(v) for k, v in args.input_shape},
        },
        "model": model,
        "versions": versions(),
        "medians": medians,
        "ratios": ratios,
        "ratios_of_minima": ratios_of_minima,
        "samples": samples,
        "teleport": {
            "free_cofactors": report.analysis.free_cofactors,
            "weights_changed": report.stats.weights_changed,
            "weights_total": report.stats.weights_total,
        },
        "verification": {
            "passed": v.passed,
            "summary": v.summary(),
            "max_abs_err": v.to_dict()["max_abs_err"],
            "max_rel_err": v.to_dict()["max_rel_err"],
            "seconds": verified.seconds["verify"],
            "total_s": verified.seconds["total"],
            "phases": verified.seconds,
        },
        "memory": memory,
        "memory_ratios": {},
        "process_peak_rss": peak_rss_bytes(),
        "profile": profile,
    }
    if all("error" not in memory.get(k, {"error": ""}) for k in ("baseline", "teleport")):
        above = {
            k: memory[k]["peak_after_run"] - memory[k]["rss_after_import"]
            for k in ("baseline", "teleport")
        }
        results["memory_ratios"] = {
            "above_imports": above,
            "ratio": above["teleport"] / max(above["baseline"], 1),
        }
    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    if not v.passed:
        print("bench_teleport: the teleported model failed verification", file=sys.stderr)
        return 1
    if args.max_ratio is not None and ratios["teleport"] > args.max_ratio:
        print(
            f"bench_teleport: teleport/baseline {ratios['teleport']:.2f}x exceeds "
            f"--max-ratio {args.max_ratio:g}",
            file=sys.stderr,
        )
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
