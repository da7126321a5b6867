"""The recogniser under the predicted-noise objective (:mod:`graphteleport.quantnoise`):
one candidate at a time, measured like the harness's rows (issue 14, Done-when 2).

Writes, from the harness's prepared ``ocr_rec`` model: the start (``equalize --method cle
--mode insert --p P``, auto's best candidate there) and that model refined by the noise
objective (:func:`graphteleport.quantnoise.noise_values` on its absorb-mode analysis: the
inserted ``Mul`` s are stored tensors there, so every class insert mode freed is free),
then quantizes each with the harness's ``quantize_static`` settings and reports output
SQNR against FP32 and exact strings on ``--held-back`` lines (the first of the harness's
128) and the FP32 check.

Run (after ``python -m experiments.quantization --models ocr_rec`` built the cache)::

    python -m experiments.quant_noise --held-back 32
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.quantization import ROOT, max_rel_err, quantize, run_batches, sqnr_db

log = logging.getLogger("experiments.quant_noise")
CACHE = ROOT / "experiments" / ".cache" / "quantization"
OUT = ROOT / "experiments" / "results" / "quant_noise.json"


def measure(task: Any, path: Path, ref: list[np.ndarray], work: Path) -> dict[str, Any]:
    """FP32 check, then per-tensor INT8: SQNR and metric on the task's held-back feeds."""
    fp32 = run_batches(path, task.held_back)
    q = work / (path.stem + ".int8.onnx")
    quantize(path, q, task.calibration, False, task.quantize_ops)
    out = run_batches(q, task.held_back)
    return {
        "fp32_rel_err": max_rel_err(ref, fp32),
        "sqnr_db": sqnr_db(ref, out),
        "metric": task.metric(out, ref),
    }


def write_start(prepared: Path, dst: Path, calib: list[dict[str, np.ndarray]], p: float) -> None:
    import onnx_ir as ir

    from graphteleport.io import save_model_atomic
    from graphteleport.passes.equalize import EqualizePass

    model = ir.load(str(prepared))
    EqualizePass(method="cle", mode="insert", p=p, calibration=calib)(model)
    save_model_atomic(model, dst)


def write_by_pass(
    prepared: Path, dst: Path, calib: list[dict[str, np.ndarray]], p: float, exact: bool
) -> None:
    import onnx_ir as ir

    from graphteleport.io import save_model_atomic
    from graphteleport.passes.equalize import EqualizePass

    model = ir.load(str(prepared))
    EqualizePass(method="noise", mode="insert", p=p, exact=exact, calibration=calib)(model)
    save_model_atomic(model, dst)


def write_refined(
    src: Path, dst: Path, calib: list[dict[str, np.ndarray]], **kw: Any
) -> dict[str, float]:
    import onnx_ir as ir

    from graphteleport.analysis import analyze_model, complete_input_shapes
    from graphteleport.io import save_model_atomic
    from graphteleport.orbit import stored_arrays
    from graphteleport.passes.equalize import feed_shapes
    from graphteleport.passes.teleport import apply_values
    from graphteleport.quantnoise import noise_values

    model = ir.load(str(src))
    shapes = complete_input_shapes(model, feed_shapes(model, {}, calib))
    analysis = analyze_model(model, shapes, "absorb")
    values, figures = noise_values(model, analysis, calib, **kw)
    apply_values(model, analysis, values, insert=False, exact=False, arrays=stored_arrays(analysis))
    save_model_atomic(model, dst)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    from experiments.quant_models import ocr_rec_task

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--held-back", type=int, default=32)
    ap.add_argument("--p", type=float, default=4.0, help="the start's insert-mode cle p")
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--smooth-p", type=float, default=16.0, help="the power mean's p (max)")
    ap.add_argument("--exact", action="store_true", help="with --pass: powers of two")
    ap.add_argument(
        "--pass",
        dest="via_pass",
        action="store_true",
        help="write the refined model by EqualizePass(method='noise', mode='insert')",
    )
    ap.add_argument("--reuse", action="store_true", help="measure the refined file written before")
    ap.add_argument("--gains", action="store_true", help="weight the sites by group gains")
    ap.add_argument("--tag", default="", help="suffix of the refined model's file name")
    ap.add_argument("--json", default=str(OUT))
    args = ap.parse_args(argv)
    task = ocr_rec_task(CACHE, 32, args.held_back)  # (the lines are a prefix of 128's)
    work = CACHE / "ocr_rec" / "noise"
    work.mkdir(parents=True, exist_ok=True)
    prepared = CACHE / "ocr_rec" / "prepared.onnx"
    calib = [{k: v[i : i + 1] for k, v in task.calibration.items()} for i in range(32)]
    ref = run_batches(prepared, task.held_back)
    rows: dict[str, Any] = {}
    start = work / f"insert_p{args.p:g}.onnx"
    t0 = time.perf_counter()
    if not start.is_file():
        write_start(prepared, start, calib, args.p)
    rows["start"] = {"seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    refined = work / f"insert_p{args.p:g}_noise{args.tag}.onnx"
    gains = None
    figures: dict[str, float] = {}
    if args.gains:
        gains, rows["gains"] = group_gains(start, task, work)
    if args.via_pass and not (args.reuse and refined.is_file()):
        write_by_pass(prepared, refined, calib, args.p, args.exact)
    elif not (args.reuse and refined.is_file()):
        figures = write_refined(
            start, refined, calib, max_iterations=args.iterations, p=args.smooth_p, gains=gains
        )
    rows["refined"] = {"seconds": time.perf_counter() - t0, **figures}
    for key, path in (("start", start), ("refined", refined)):
        rows[key].update(measure(task, path, ref, work))
        rows[key]["predicted"] = predicted(path, calib)
        log.info("%s: %s", key, {k: v for k, v in rows[key].items() if k != "predicted"})
    rows["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "held_back": args.held_back,
        "p": args.p,
        "exact": bool(args.exact),
        "by_pass": bool(args.via_pass),
        "load_average": os.getloadavg()[0],
    }
    out = Path(args.json)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(out)
    return 0


def predicted(path: Path, calib: list[dict[str, np.ndarray]], top: int = 8) -> dict[str, Any]:
    """The objective's prediction for the model as it is (``u = 0``): the summed ``R_s``
    per kind of site (weight, activation, constant) and the ``top`` sites; sites no
    movable pair reaches are not counted."""
    import onnx_ir as ir

    from graphteleport.analysis import analyze_model, complete_input_shapes
    from graphteleport.passes.equalize import feed_shapes
    from graphteleport.quantnoise import NoiseObjective, activation_sites, stored_sites

    model = ir.load(str(path))
    shapes = complete_input_shapes(model, feed_shapes(model, {}, calib))
    analysis = analyze_model(model, shapes, "absorb")
    sites = stored_sites(model, analysis, ("all",)) + activation_sites(
        model, analysis, calib, ("all",)
    )
    n = analysis.solution.num_pairs
    r = NoiseObjective(sites, n).per_site(np.zeros(n)) if sites else np.zeros(0)
    kinds: dict[str, float] = {}
    for site, x in zip(sites, r, strict=True):
        kinds[site.kind] = kinds.get(site.kind, 0.0) + float(x)
    order = np.argsort(-r)[:top]
    return {
        "total": float(r.sum()),
        "by_kind": kinds,
        "top": [{"site": sites[i].name, "kind": sites[i].kind, "r": float(r[i])} for i in order],
    }


def group_gains(
    model_path: Path, task: Any, work: Path, buckets: int = 8
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Per site of ``model_path``'s per-tensor QDQ model (quantized on the calibration
    batch): a sensitivity ``g`` shared by its group (kind × depth bucket), measured on the
    *calibration* feeds: the output noise-to-signal ratio with only the group's sites
    quantized, divided by the sum of their predicted ``R_s`` (:mod:`graphteleport.quantnoise`
    at ``u = 0``).  Never sees the held-back feeds."""
    import onnx
    import onnx_ir as ir

    from experiments.quant_diagnose import Evaluator, read_sites
    from graphteleport.analysis import analyze_model, complete_input_shapes
    from graphteleport.passes.equalize import feed_shapes
    from graphteleport.quantnoise import NoiseObjective, activation_sites, stored_sites

    calib = [{k: v[i : i + 1] for k, v in task.calibration.items()} for i in range(32)]
    model = ir.load(str(model_path))
    shapes = complete_input_shapes(model, feed_shapes(model, {}, calib))
    analysis = analyze_model(model, shapes, "absorb")
    sites = stored_sites(model, analysis, ("all",)) + activation_sites(
        model, analysis, calib, ("all",)
    )
    predicted = NoiseObjective(sites, analysis.solution.num_pairs).per_site(
        np.zeros(analysis.solution.num_pairs)
    )
    proto = onnx.load(str(model_path))
    order: dict[str, int] = {}
    for k, node in enumerate(proto.graph.node):
        for name in [*node.input, *node.output]:
            order.setdefault(name, k)
    n_nodes = max(len(proto.graph.node), 1)
    q = work / (model_path.stem + ".gains.int8.onnx")
    quantize(model_path, q, task.calibration, False, task.quantize_ops)
    qsites = {s.name: s for s in read_sites(onnx.load(str(q)), proto, None)}
    ev = Evaluator(proto, task.calibration, work)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, s in enumerate(sites):
        if s.name in qsites:
            bucket = min(buckets - 1, order.get(s.name, 0) * buckets // n_nodes)
            groups.setdefault((s.kind, bucket), []).append(i)
    gains: dict[str, float] = {}
    rows = []
    for (kind, bucket), members in sorted(groups.items()):
        db = ev.sqnr([qsites[sites[i].name] for i in members])
        measured = 10.0 ** (-db / 10.0)
        pred = float(predicted[members].sum())
        g = measured / pred if pred > 0 else 1.0
        rows.append({"kind": kind, "bucket": bucket, "sites": len(members),
                     "measured_db": db, "predicted": pred, "gain": g})  # fmt: skip
        log.info("gain %s %d (%d sites): measured %.2f dB, predicted %.2f dB: g %.3g", kind,
                 bucket, len(members), db, -10 * np.log10(max(pred, 1e-30)), g)  # fmt: skip
        for i in members:
            gains[sites[i].name] = g
    return gains, rows


if __name__ == "__main__":
    sys.exit(main())


# -- the document's section ----------------------------------------------------------------------
def section(results: dict[str, Any]) -> str:
    """The start and the refined model: held-back SQNR, exact strings, the FP32 check, the
    objective's predicted noise by kind of site and its largest sites (markdown)."""
    if not results or "refined" not in results:
        return "(not run: `python -m experiments.quant_noise --held-back 128 --pass`)"
    meta = results.get("meta", {})
    lines = [
        "| model | SQNR dB | exact strings % | FP32 max rel err | predicted R: weights / "
        "activations / constants (sum) |",
        "|---|---|---|---|---|",
    ]
    names = {"start": f"insert cle p={meta.get('p', 4):g}", "refined": "+ noise objective"}
    for key in ("start", "refined"):
        r = results[key]
        pred = r.get("predicted", {})
        kinds = pred.get("by_kind", {})
        parts = " / ".join(f"{kinds.get(k, 0.0):.3g}" for k in ("weight", "activation", "constant"))
        lines.append(
            f"| {names[key]} | {r['sqnr_db']:.2f} | {r['metric']:.1f} | "
            f"{r['fp32_rel_err']:.1e} | {parts} ({pred.get('total', 0.0):.3g}) |"
        )
    top = results["refined"].get("predicted", {}).get("top", [])
    if top:
        lines.append("")
        lines.append(
            "Largest predicted sites after refinement: "
            + ", ".join(f"`{t['site']}` ({t['kind']}, {t['r']:.2g})" for t in top)
            + "."
        )
    lines.append("")
    how = "written by `--method noise`" if meta.get("by_pass") else "refined from the start"
    lines.append(
        f"({meta.get('held_back')} held-back lines, {meta.get('date')}, load average "
        f"{meta.get('load_average', 0.0):.1f}; the refined model {how}"
        f"{', --exact' if meta.get('exact') else ''}.)"
    )
    return "\n".join(lines)
