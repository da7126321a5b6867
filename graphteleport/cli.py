"""The ``graphteleport`` command: parse, call the library, format the result.

Exit codes: 0 done; 1 verification failed (no model written; the failed report is,
with ``--report``); 2 bad input or usage, or not enough memory (one line on stderr,
no traceback, nothing written); 3 an internal error (one line; rerun with
``--debug`` for the traceback); 130 interrupted (SIGINT), 143 terminated (SIGTERM):
temporary files are removed and no partial output is left.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from graphteleport import __version__
from graphteleport.errors import GraphTeleportError, VerificationError
from graphteleport.interrupts import signals_held

if TYPE_CHECKING:
    from graphteleport.pipeline import TeleportOptions
    from graphteleport.reports import AnalysisReport, InputShapes, InspectReport, TeleportReport
    from graphteleport.verify import VerificationResult

# The pipeline (onnx, onnx_ir, numpy's heavy users) is imported once the arguments are
# parsed: a usage error, --help or --version answers without it.  Each subcommand imports
# what only it needs (compare: the orbit's solver; equalize: its pass), so a teleport does
# not pay for them at start-up.

EXAMPLES = """examples:
  graphteleport model.onnx -o teleported.onnx
  graphteleport model.onnx -o t.onnx --sampling inter_landscape --cob-range 0.9 --seed 1
  graphteleport model.onnx -o t.onnx --input-shape input_ids=1,16 --report report.json
  graphteleport inspect model.onnx
  graphteleport compare model.onnx teleported.onnx --report compare.json
  graphteleport canonicalize model.onnx -o canonical.onnx --report r.json
  graphteleport equalize model.onnx -o equalized.onnx --exact --report r.json

subcommands: a first argument 'inspect', 'canonicalize', 'equalize' or 'compare' names the
subcommand (see 'graphteleport equalize --help'); to teleport a file called so, write
./inspect.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"graphteleport: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.split(",")) if dims else ()
    except ValueError:
        shape = (-1,)
    if not sep or not name or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(
            f"--input-shape expects NAME=D1,D2,... with positive sizes, got {text!r}"
        )
    return name, shape


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input-shape",
        type=_shape,
        action="append",
        default=[],
        metavar="NAME=DIMS",
        help="concrete sizes for an input with dynamic dimensions, instead of those found "
        "by running the model (repeatable)",
    )
    p.add_argument("--report", metavar="REPORT.json", help="also write the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")


def _verification(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    p.add_argument("--inputs", metavar="FEEDS.npz", help="verify on these inputs too")
    p.add_argument(
        "--draws",
        type=int,
        default=8,
        metavar="N",
        help="random input draws verification compares outputs on (default 8; 0 with "
        "--inputs: only yours)",
    )
    p.add_argument(
        "--outputs-only",
        action="store_true",
        help="skip the per-tensor check (every intermediate tensor = τ ⊙ the original's)",
    )
    p.add_argument(
        "--rtol",
        type=float,
        help="verification tolerance (default 1e-5; fp16/bf16: from the dtype and depth)",
    )
    p.add_argument(
        "--verify-by",
        choices=("auto", "whole", "pieces"),
        default="auto",
        help="verify both whole models, or block by block (bounded memory); auto: whole "
        "where its estimate fits in available memory (default)",
    )


def _model_in_out(p: argparse.ArgumentParser, verb: str, insert_help: str) -> None:
    """The model to ``verb``, ``-o OUTPUT`` and ``--mode`` (what insert mode adds)."""
    done_as = {"teleport": "teleported", "canonicalize": "canonical", "equalize": "equalized"}
    done = done_as.get(verb, verb)
    from graphteleport.options import MODES

    p.add_argument("model", help=f"the ONNX model to {verb} (never modified)")
    p.add_argument("-o", "--output", required=True, help=f"where to write the {done} model")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="absorb",
        help=f"absorb: change weights only (default); insert: {insert_help}",
    )


def teleport_parser() -> argparse.ArgumentParser:
    from graphteleport.options import SAMPLINGS

    p = _Parser(
        prog="graphteleport",
        description="Teleport a neural network: rescale its neurons so its weights change "
        "and its function does not, then prove it with onnxruntime.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_in_out(
        p,
        "teleport",
        "also add Mul nodes so non-equivariant activations and negative cofactors work",
    )
    p.add_argument(
        "--rescale-residual",
        action="store_true",
        help="insert mode: let a residual Add rescale one branch (more cofactors)",
    )
    p.add_argument(
        "--rescale-clip",
        action="store_true",
        help="rewrite Clip/ReLU6 as Min(Relu(x), 6) so its bounds absorb the cofactors "
        "(changes the graph; more cofactors, no Mul nodes)",
    )
    p.add_argument(
        "--sampling",
        choices=SAMPLINGS,
        default="intra_landscape",
        help="how cofactors are drawn (default intra_landscape)",
    )
    p.add_argument(
        "--cob-range",
        type=float,
        default=0.5,
        metavar="R",
        help="half-width r of the sampling interval (default 0.5)",
    )
    p.add_argument("--center", type=float, default=1.0, help="centre c for --sampling centered")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--exact", action="store_true", help="powers-of-two cofactors: bit-identical outputs"
    )
    _verification(p)
    p.add_argument("--version", action="version", version=f"graphteleport {__version__}")
    _common(p)
    return p


def canonicalize_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="graphteleport canonicalize",
        description="Write the canonical form of a network: the point of its orbit under "
        "positive cofactors with the least sum of squared weights and biases (the signs of "
        "sign-group cofactors by a rule), then prove the function is unchanged with "
        "onnxruntime.  A model and any teleport of it get the same canonical form "
        "(negative cofactors too: a sign rule picks the signs).",
    )
    _model_in_out(p, "canonicalize", "also free the cofactors that need Mul nodes")
    _verification(p)
    _common(p)
    return p


def equalize_parser() -> argparse.ArgumentParser:
    _onnx_ir()
    from graphteleport.passes.equalize import DEFAULT_P, METHODS

    p = _Parser(
        prog="graphteleport equalize",
        description="Equalize a network for per-tensor INT8 quantization: choose the "
        "cofactors that balance the ranges of the quantized weights across every free "
        "cofactor class (cle: the least sum over tensors of the p-th power mean of |W|; "
        "smooth: SmoothQuant's activation/weight balance on calibration inputs), then prove "
        "the function is unchanged with onnxruntime.",
    )
    _model_in_out(p, "equalize", "also free the cofactors that need Mul nodes")
    p.add_argument(
        "--method",
        choices=METHODS,
        default="cle",
        help="cle: data-free cross-layer equalization (default); smooth: activation-aware, "
        "needs --calibration; auto: the candidate (none, cle for several P, smooth for "
        "several A, cle in insert mode) whose simulated per-tensor INT8 model has the best "
        "output SQNR on --calibration, where the feeds separate it from the default, cle "
        "p=3 in insert mode (else that default; absorb mode where insert's balance does "
        "not converge); noise: the least predicted INT8 noise of every quantized site "
        "(weights, activations, constants) on --calibration (with --mode insert: from cle "
        "p=P's Muls)",
    )
    p.add_argument(
        "--int8-ops",
        metavar="OPS",
        help="auto, noise: the op types the INT8 quantizer quantizes, comma-separated, or "
        "'all' (default: auto the Conv/Gemm/MatMul operands only, noise all)",
    )
    p.add_argument(
        "--auto-candidates",
        metavar="NAMES",
        help="auto: compute only these candidates, comma-separated, named as the report's "
        "'candidates' names them (e.g. 'insert cle p=3'); one alone is the choice — each "
        "candidate's model as auto writes it (default: all)",
    )
    p.add_argument(
        "--p",
        type=float,
        default=DEFAULT_P,
        metavar="P",
        help=f"cle: the power mean balanced, 1 < P <= 64 (default {DEFAULT_P:g})",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        metavar="A",
        help="smooth: migration strength in [0, 1] (default 0.5)",
    )
    p.add_argument(
        "--calibration", metavar="FEEDS.npz", help="smooth: inputs to measure activations on"
    )
    p.add_argument(
        "--exact",
        action="store_true",
        help="round the cofactors to powers of two: bit-identical outputs",
    )
    p.add_argument(
        "--keep-clips",
        action="store_true",
        help="leave Clips (ReLU6) as they are; by default each Clip with constant bounds "
        "becomes Min(Relu(x), 6), whose bound absorbs the cofactor (no Mul), so its "
        "channels can be equalized",
    )
    _verification(p)
    _common(p)
    return p


def inspect_parser() -> argparse.ArgumentParser:
    from graphteleport.options import MODES

    p = _Parser(
        prog="graphteleport inspect",
        description="Analyse a model: free cofactors, their groups, what is pinned and why.",
    )
    p.add_argument("model", help="the ONNX model to analyse")
    p.add_argument("--mode", choices=MODES, default="absorb")
    _common(p)
    return p


COMPARE_DESCRIPTION = (
    "Decide whether model B is model A teleported (absorb mode): the same graph up to "
    "names, every weight A's times cofactors. Exit 0 same, 1 different, 2 bad input "
    "(missing file, different graphs)."
)


def compare_parser() -> argparse.ArgumentParser:
    _onnx_ir()
    from graphteleport.compare import TOLERANCE_FLOAT32

    p = _Parser(prog="graphteleport compare", description=COMPARE_DESCRIPTION)
    p.add_argument("model_a", help="the original ONNX model")
    p.add_argument("model_b", help="the model to test against it")
    p.add_argument(
        "--tolerance",
        type=float,
        default=TOLERANCE_FLOAT32,
        help="residual |log|B/A| - log|S|| allowed in float32, scaled by each weight's "
        "epsilon (default 1e-5)",
    )
    _common(p)
    return p


def _compare(argv: list[str]) -> int:
    _onnx_ir()
    from graphteleport.compare import compare_files, summary_lines

    args = compare_parser().parse_args(argv)
    _imports_done()
    result = compare_files(
        args.model_a,
        args.model_b,
        dict(args.input_shape),
        tolerance=args.tolerance,
        report_path=args.report,
    )
    if not args.quiet:
        print("\n".join(summary_lines(result)))
    return 0 if result.same else 1


# -- formatting ---------------------------------------------------------------------------------
def format_analysis(r: AnalysisReport) -> list[str]:
    groups = ", ".join(f"{k} {v}" for k, v in sorted(r.groups.items())) or "none"
    lines = [f"  free cofactors: {r.free_cofactors} of {r.cofactor_pairs} ({groups})"]
    pinned = r.pinned
    total = r.pinned_cofactors
    lines.append(
        f"  pinned: {total} cofactor{'s' if total != 1 else ''}" + (" by reason:" if pinned else "")
    )
    for p in pinned[:12]:
        where = ", ".join(p.values[:3]) + (", ..." if len(p.values) > 3 else "")
        lines.append(f"    {p.cofactors:>7}  {p.reason}" + (f"  [{where}]" if where else ""))
    if len(pinned) > 12:
        lines.append(f"    ... {len(pinned) - 12} more reasons in --report")
    return lines


def format_inputs(input_shapes: InputShapes | None) -> list[str]:
    """One line for the inputs whose dynamic axes were sized, and how (none if static)."""
    parts = []
    for name, entry in (input_shapes or {}).items():
        if entry["axes"]:
            parts.append(f"{name} [{','.join(map(str, entry['shape']))}] ({entry['brief']})")
    return [f"  input shapes: {', '.join(parts)}"] if parts else []


def format_teleport(r: TeleportReport) -> str:
    o = r.options
    lines = [f"graphteleport: {r.model} -> {r.output}"]
    rng = f" (r={o.cob_range})"
    lines.append(
        f"  mode {o.mode}, sampling {o.sampling}{rng}, seed {o.seed}"
        + (", exact (powers of two)" if o.exact else "")
    )
    lines += format_inputs(r.input_shapes)
    lines += format_analysis(r.analysis)
    return "\n".join(lines + _outcome(r))


def format_canonical(r: TeleportReport) -> str:
    lines = [f"graphteleport canonicalize: {r.model} -> {r.output}"]
    c = r.canonical or {}
    before, after = c.get("objective_before", 0.0), c.get("objective_after", 0.0)
    lines.append(
        f"  mode {r.options.mode}; sum of squared weights that move {before:.6g} -> {after:.6g} "
        f"in {int(c.get('iterations', 0))} Newton steps "
        f"(max |gradient|/F {c.get('gradient', 0.0):.2g})"
    )
    return _with_outcome(lines, r)


def _with_outcome(lines: list[str], r: TeleportReport) -> str:
    """``lines`` then the inputs, the analysis and the outcome (:func:`_outcome`)."""
    lines = lines + format_inputs(r.input_shapes) + format_analysis(r.analysis)
    return "\n".join(lines + _outcome(r))


def format_equalize(r: TeleportReport) -> str:
    e = r.equalize or {}
    lines = [f"graphteleport equalize: {r.model} -> {r.output}"]
    how = (
        f"p={e.get('p', 0.0):g}"
        if e.get("method") in ("cle", "noise")
        else f"alpha={e.get('alpha')}"
    )
    lines.append(
        f"  method {e.get('method')} ({how}), mode {r.options.mode}"
        + (", exact (powers of two)" if r.options.exact else "")
    )
    if e.get("method") == "cle":
        lines.append(
            f"  balance {e.get('objective_before', 0.0):.6g} -> "
            f"{e.get('objective_after', 0.0):.6g} in {int(e.get('iterations', 0))} Newton steps "
            f"(max |gradient|/B {e.get('gradient', 0.0):.2g})"
        )
    tensors = e.get("tensors", [])
    lines.append(
        f"  quantized weights: {len(tensors)} tensors, {e.get('weight_elements_moved', 0)}/"
        f"{e.get('weight_elements', 0)} elements moved ({e.get('fraction_moved', 0.0):.2%})"
    )
    lines.append(
        "  predicted per-tensor INT8 weight SQNR: mean "
        f"{e.get('mean_sqnr_db_before', 0.0):.2f} dB -> {e.get('mean_sqnr_db_after', 0.0):.2f} dB"
        f"; noise/signal {e.get('predicted_noise_before', 0.0):.3g} -> "
        f"{e.get('predicted_noise_after', 0.0):.3g}"
    )
    return _with_outcome(lines, r)


def _outcome(r: TeleportReport) -> list[str]:
    """What changed, the verification and the time, as format_teleport prints them."""
    o = r.options
    lines: list[str] = []
    s = r.stats
    frac = s.elements_changed / max(s.elements_total, 1)
    lines.append(
        f"  weights changed: {s.weights_changed}/{s.weights_total} "
        f"tensors, {s.elements_changed}/{s.elements_total} elements ({frac:.2%})"
    )
    fixes = r.range_fixes
    if fixes:
        moved = sum(f.cofactors for f in fixes)
        pinned = sum(f.pinned for f in fixes)
        lines.append(
            f"  kept in range: {moved} cofactors moved toward 1 ({pinned} pinned), e.g. "
            f"{fixes[0].reason}"
        )
    if r.clips_split:
        lines.append(f"  Clips made rescalable: {r.clips_split} (Clip -> Min(Relu(x), c))")
    if o.mode == "insert":
        ins = r.inserted
        lines.append(
            f"  nodes added: {ins.nodes_added} ({ins.wraps} activations wrapped, "
            f"{ins.edge_scales} edges scaled, {ins.merged} Mul pairs merged)"
        )
    v = r.verification
    if v is None:
        lines.append("  verification: skipped (--no-verify)")
    else:
        state = "passed" + (" (bit-exact)" if v.exact else "") if v.passed else "FAILED"
        lines.append(
            f"  verification: {state}: max abs err {v.max_abs_err:.3g}, "
            f"max rel err {v.max_rel_err:.3g} (rtol {v.tolerance['rtol']:g})"
        )
        lines.append("    " + _proof_scope(v))
    t = r.seconds
    phases = ("analyze", "solve", "rewrite", "figures", "save", "verify", "total")
    lines.append("  time: " + ", ".join(f"{k} {t[k]:.2f}s" for k in phases if k in t))
    return lines


def _proof_scope(v: VerificationResult) -> str:
    """What the verification covered, e.g. 'on 8 input draws; 16 tensors node by node'."""
    draws = v.inputs
    scope = f"on {draws} input draw{'s' if draws != 1 else ''}"
    scope += (
        f", block by block ({v.blocks} block{'s' if v.blocks != 1 else ''})"
        if v.method == "pieces"
        else ", whole models"
    )
    t = v.tensors
    if t is None:
        return scope + "; outputs only (--outputs-only)"
    return scope + f"; {t.tensors} tensors node by node ({t.elements} elements compared)"


def format_inspect(r: InspectReport) -> str:
    a = r.analysis
    lines = [
        f"graphteleport inspect: {r.model} (mode {r.mode})",
        f"  neurons: {a.neurons} in {a.neuron_groups} groups, "
        f"{a.weights_in_quiver} weights between groups",
    ]
    lines += format_inputs(r.input_shapes)
    lines += format_analysis(a)
    for mode, m in r.modes.items():
        extra = ""
        if mode == "insert":
            extra = f"; may wrap {len(m.wrap_nodes)} nodes, scale {len(m.edge_scales)} edges"
        lines.append(f"  {mode} mode: {m.free_cofactors} free cofactors{extra}")
    return "\n".join(lines)


# -- running ------------------------------------------------------------------------------------
class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so it unwinds like Ctrl-C: every ``finally``
    runs and the staged temporaries are removed."""


def _raise_terminated(_signum: int, _frame: FrameType | None) -> NoReturn:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` for the duration (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str]) -> int:
    if argv and argv[0] == "compare":
        return _compare(argv[1:])
    if argv and argv[0] == "inspect":
        args = inspect_parser().parse_args(argv[1:])
        _onnx_ir()
        from graphteleport.pipeline import inspect_file

        _imports_done()
        inspected = inspect_file(
            args.model, dict(args.input_shape), args.mode, report_path=args.report
        )
        if not args.quiet:
            print(format_inspect(inspected))
        return 0
    if argv and argv[0] == "canonicalize":
        args = canonicalize_parser().parse_args(argv[1:])
        _onnx_ir()
        from graphteleport.pipeline import canonicalize_file

        opts = _verify_options(args, mode=args.mode)
        _imports_done()
        report = canonicalize_file(
            args.model, args.output, opts, _progress(args), report_path=args.report,
            bars=_bars(args),
        )  # fmt: skip
        if not args.quiet:
            print(format_canonical(report))
        return 0
    if argv and argv[0] == "equalize":
        return _equalize(argv[1:])
    args = teleport_parser().parse_args(argv)
    from graphteleport.options import CofactorOptions

    _onnx_ir()
    from graphteleport.pipeline import teleport_file

    # The cofactor options' flags are named as its fields (--cob-range: cob_range).
    opts = _verify_options(
        args, **{f.name: getattr(args, f.name) for f in dataclasses.fields(CofactorOptions)}
    )
    _imports_done()
    # With --report the report is committed with the model, or written alone (exit 1)
    # after a failed verification.
    report = teleport_file(
        args.model, args.output, opts, _progress(args), report_path=args.report, bars=_bars(args)
    )
    if not args.quiet:
        print(format_teleport(report))
    return 0


def _equalize(argv: list[str]) -> int:
    args = equalize_parser().parse_args(argv)
    _onnx_ir()
    from graphteleport.pipeline import equalize_file

    opts = _verify_options(args, mode=args.mode, exact=args.exact, rescale_clip=not args.keep_clips)
    _imports_done()
    report = equalize_file(
        args.model, args.output, opts, _progress(args), report_path=args.report,
        method=args.method, p=args.p, alpha=args.alpha, calibration=args.calibration,
        int8_ops=None if args.int8_ops is None else tuple(args.int8_ops.split(",")),
        candidates=None if args.auto_candidates is None else tuple(
            c.strip() for c in args.auto_candidates.split(",")
        ),
    )  # fmt: skip
    if not args.quiet:
        print(format_equalize(report))
    return 0


def _verify_options(args: argparse.Namespace, **cofactor: Any) -> TeleportOptions:
    """The options of a verified job from the parsed flags.  Every option value is checked
    here (InputError: exit 2), before any file is touched."""
    from graphteleport.pipeline import TeleportOptions

    return TeleportOptions(
        **cofactor,
        verify=not args.no_verify,
        rtol=args.rtol,
        verify_by=args.verify_by,
        inputs=args.inputs,
        input_shapes=dict(args.input_shape),
        draws=args.draws,
        tensor_check=not args.outputs_only,
    )


def _progress(args: argparse.Namespace) -> Callable[[str], None]:
    """Progress goes to an interactive terminal only: logs and pipes see just the result."""
    if not args.quiet and sys.stderr.isatty():
        return lambda m: print(f"  ... {m}", file=sys.stderr)
    return lambda _m: None


def _bars(args: argparse.Namespace) -> bool:
    """Progress bars (phases over 2 s) on an interactive terminal, unless -q."""
    return not args.quiet and sys.stderr.isatty()


#: What :func:`_starting` holds until the job's modules are imported (:func:`_imports_done`).
_startup = contextlib.ExitStack()
#: Whether ``main`` runs the process (set by :func:`_starting`).
_process = {"owned": False}


@contextlib.contextmanager
def _starting(process: bool) -> Iterator[None]:
    """From the start until the job's modules are imported (:func:`_imports_done`, or
    the end):

    * SIGINT and SIGTERM are held (:func:`graphteleport.interrupts.signals_held`) and
      handled once the imports are done: an interrupt raised while numpy, onnx or
      onnx_ir initialise their compiled parts can come out as an ``ImportError`` (an
      internal error, exit 3, instead of a clean exit 130 or 143);
    * where ``main`` runs the process (``process``; a caller's collector is left alone),
      Python's cyclic garbage collector is off: imports create some 70 000 long-lived
      objects, and every full collection meanwhile walks them all for nothing
      (ResNet-50 ``--no-verify``: two full and ~30 partial collections, 0.08-0.2 s of a
      2 s run); afterwards those objects are frozen (``gc.freeze``: the job's
      collections no longer walk them) and it collects as usual.
    """
    with _startup:
        _startup.enter_context(signals_held())
        _process["owned"] = process
        _startup.callback(_process.update, owned=False)
        if process and gc.isenabled():
            gc.disable()
            _startup.callback(_collect_again)
        yield


def _collect_again() -> None:
    gc.freeze()
    gc.enable()


def _onnx_ir() -> None:
    """Where ``main`` runs the process, import onnx_ir with sympy deferred to its first
    use (:func:`graphteleport.startup.import_onnx_ir`: ~0.25 s less at start-up); else
    nothing (a caller's process imports as it does)."""
    if _process["owned"]:
        from graphteleport.startup import import_onnx_ir

        import_onnx_ir()


def _imports_done() -> None:
    """End what :func:`_starting` holds: a signal that came meanwhile is handled now."""
    _startup.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``graphteleport`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="graphteleport: %(message)s")
    debug = "--debug" in args
    try:
        with _sigterm_as_interrupt(), _starting(argv is None):
            return _run(args)
    except VerificationError as e:
        print(f"graphteleport: {e}", file=sys.stderr)
        return 1
    except GraphTeleportError as e:
        print(f"graphteleport: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # Staged files are removed on the way out; a commit is never cut in half.
        name, code = ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        print(f"graphteleport: {name}; no partial output was left", file=sys.stderr)
        return code
    except BrokenPipeError:  # stdout closed early (`graphteleport ... | head`): work is done
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except MemoryError as e:
        print(
            f"graphteleport: error: not enough memory ({e or 'MemoryError'}); "
            "try smaller --input-shape sizes or a machine with more memory",
            file=sys.stderr,
        )
        return 2
    except Exception as e:  # an internal error: one line, traceback with --debug
        if debug:
            raise
        print(
            f"graphteleport: internal error: {type(e).__name__}: {e} "
            "(rerun with --debug and report it)",
            file=sys.stderr,
        )
        return 3
