"""An impossibility certificate for INT8 accuracy under rescaling (issue 14, Done-when 2:
"where per-tensor INT8 loses task accuracy, equalize recovers it to within 1 point of FP32").

A rescaling of the given analysis mode (graphteleport ``equalize``'s orbit: its Clips split
first, as the pass does) multiplies each value ``v`` by its per-neuron cofactors
``τ[neurons[v]]`` and each stored tensor by its ``S``.  A quantization *site* (a value or a
stored tensor that onnxruntime's per-tensor QDQ quantizer quantizes, read from its QDQ model
by :func:`experiments.quant_diagnose.read_sites`) is **fixed** when no rescaling of the mode
changes it:

* an activation (or a graph input) whose neurons all belong to pairs that are not free
  (pinned, or moving no stored tensor and no inserted ``Mul``), or that the analysis does
  not reach: its values on the calibration batch, hence its MinMax range, scale and zero
  point, are the same after any rescaling;
* a weight or a constant whose every use scales by pairs that are not free (``S = 1``);
* an INT32 bias that is fixed itself and whose node's input and weight sites are fixed
  (its scale is theirs multiplied).

A sign-group pair counts as free (a sign flip moves an asymmetric activation range), so
the selection errs towards fewer fixed sites.  For every rescaling ``R`` of the mode, the
rescaled model with only the fixed sites quantized computes what the original model with
only the fixed sites quantized computes (``R`` is the identity at each of them and commutes
with everything between), so the *certificate model* — the prepared FP32 model with only
the fixed sites quantized-dequantized, everything else in float — is one fixed model for
the whole orbit, and every INT8 model of a rescaled model is it plus the noise of the other
sites.  If the certificate model already loses the task accuracy, a rescaling of that mode
can recover it only if the other sites' rounding errors cancel the fixed sites' — which is
what "no rescaling can recover it" means here (not a theorem about cancellation).

The selection is checked, not trusted: ``--check K`` draws ``K`` random rescalings of the
mode (``t = exp(N(0, 0.5²))`` on every movable pair), writes each into a copy with
graphteleport's own rewrite, and compares every fixed site there with the original — a
weight's values, an activation's MinMax range over the calibration batch (relative
difference ≤ 1e-5; float32 rounding through a rescaled layer is ~1e-7).  Peers' CLE is a
weight-only (absorb-mode) rescaling, so an absorb-mode certificate covers them too.

Run::

    python -m experiments.quant_certificate ocr_rec  # experiments/results/quant_certificate.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.quant_diagnose import Site, read_sites, with_sites
from experiments.quantization import (
    ROOT,
    prepare,
    quantize,
    read_results,
    run_batches,
    sqnr_db,
    write_results,
)

OUT = ROOT / "experiments" / "results" / "quant_certificate.json"
MODES = ("absorb", "insert")
#: the largest relative change of a fixed site the check accepts (float32 rounding)
CHECK_RTOL = 1e-5
log = logging.getLogger("experiments.quant_certificate")


def orbit_analysis(path: Path, shapes: Mapping[str, tuple[int, ...]], mode: str) -> Any:
    """The analysis ``equalize`` sees of the model at ``path`` in ``mode``: its Clips with
    constant bounds split first (:func:`graphteleport.clips.split_clips`), as the pass does
    before choosing; the split model and its analysis."""
    import onnx_ir as ir

    from graphteleport.analysis import analyze_model
    from graphteleport.clips import split_clips

    model = ir.load(str(path))
    split_clips(model)
    return model, analyze_model(model, dict(shapes), mode)  # type: ignore[arg-type]


def pairs_of(analysis: Any, site: Site) -> np.ndarray | None:
    """The cofactor pairs a site scales with (an activation: its neurons'; a stored tensor:
    every factor's of every use); ``None`` when the analysis does not reach it (fixed)."""
    pair = analysis.solution.pair
    if site.kind == "activation":
        ids = analysis.neurons.get(site.name)
        return None if ids is None else pair[np.asarray(ids).reshape(-1)]
    weight = analysis.weight_named(site.name)
    if weight is None:
        return None
    ids = [np.asarray(f.ids).reshape(-1) for u in weight.uses for f in u.factors]
    return pair[np.concatenate(ids)] if ids else np.zeros(0, dtype=np.int64)


def fixed_sites(model: Any, analysis: Any, sites: Sequence[Site]) -> list[Site]:
    """The sites no rescaling of ``analysis``'s mode changes (module docstring)."""
    free = np.asarray(analysis.solution.free, dtype=bool)

    def own(site: Site) -> bool:
        pairs = pairs_of(analysis, site)
        return pairs is None or not free[pairs].any()

    by_name = {(s.name, s.kind): own(s) for s in sites}
    readers = bias_operands(model)
    out = []
    for s in sites:
        ok = by_name[(s.name, s.kind)]
        if ok and s.kind == "bias":  # its INT32 scale is s_x · s_W
            x, w = readers.get(s.name, ("", ""))
            ok = fixed_value(x, by_name, analysis, free) and by_name.get((w, "weight"), False)
        if ok:
            out.append(s)
    return out


def bias_operands(model: Any) -> dict[str, tuple[str, str]]:
    """Per bias initializer (input 2 of a Conv/ConvTranspose, input 2 of a Gemm), the names
    of its node's input and weight."""
    out = {}
    for node in model.graph:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2:
            x, w, b = node.inputs[:3]
            if b is not None and x is not None and w is not None:
                out[b.name or ""] = (x.name or "", w.name or "")
    return out


def fixed_value(
    name: str, sites: Mapping[tuple[str, str], bool], analysis: Any, free: np.ndarray
) -> bool:
    """A value is fixed: its site's verdict where it is one, else from its neurons."""
    if (name, "activation") in sites:
        return sites[(name, "activation")]
    ids = analysis.neurons.get(name)
    return ids is None or not free[analysis.solution.pair[np.asarray(ids).reshape(-1)]].any()


# -- the check -----------------------------------------------------------------------------------
def check_fixed(
    model: Any,
    shapes: Mapping[str, tuple[int, ...]],
    fixed: Sequence[Site],
    others: Sequence[Site],
    feeds: Mapping[str, np.ndarray],
    mode: str,
    draws: int,
    folder: Path,
) -> dict[str, Any]:
    """Draw ``draws`` random rescalings of the mode, write each into a copy, and compare
    every site there with the original (module docstring): the fixed sites that changed
    (must be none) and the other sites that did (how much of the rest a rescaling moves)."""
    import onnx_ir as ir

    from graphteleport.analysis import analyze_model
    from graphteleport.orbit import movable_pairs
    from graphteleport.passes.teleport import apply_values

    proto = ir.to_proto(model)
    base = site_values(proto, [*fixed, *others], feeds, folder)
    worst, changed_fixed, changed_other = 0.0, set(), set()
    for k in range(draws):
        copy = ir.from_proto(proto)
        mine = analyze_model(copy, dict(shapes), mode)  # type: ignore[arg-type]
        movable = movable_pairs(mine)
        rng = np.random.default_rng(k)
        values = np.where(movable, np.exp(rng.normal(0.0, 0.5, movable.size)), 1.0)
        apply_values(copy, mine, values, insert=mode == "insert")
        after = site_values(ir.to_proto(copy), [*fixed, *others], feeds, folder)
        for s in fixed:
            d = relative_change(base[s.name], after.get(s.name))
            worst = max(worst, d)
            if d > CHECK_RTOL:
                changed_fixed.add(s.name)
        for s in others:
            if relative_change(base[s.name], after.get(s.name)) > CHECK_RTOL:
                changed_other.add(s.name)
    return {
        "draws": draws,
        "fixed_changed": sorted(changed_fixed),
        "fixed_worst_rel_change": worst,
        "others_changed": len(changed_other),
        "others": len({s.name for s in others}),
    }


#: the harness's peer rows (``experiments.quantization``): their FP32 models in its cache
PEER_ROWS = ("aimet", "onnxsim", "quark")


def check_peers(
    prepared: Any, work: Path, fixed: Sequence[Site], feeds: Mapping[str, np.ndarray], folder: Path
) -> dict[str, Any]:
    """Per peer whose equalized FP32 model the harness left in ``work``: the absorb-mode
    fixed sites it changed (beyond :data:`CHECK_RTOL`) and those it no longer has — a
    peer's CLE is a weight-only rescaling, so it must change none."""
    import onnx

    base = site_values(prepared, fixed, feeds, folder)
    out: dict[str, Any] = {}
    for peer in PEER_ROWS:
        path = work / f"{peer}.fp32.onnx"
        if not path.is_file():
            continue
        after = site_values(onnx.load(str(path)), fixed, feeds, folder)
        gone = sorted(s.name for s in fixed if s.name not in after)
        moved = sorted(
            s.name
            for s in fixed
            if s.name in after and relative_change(base[s.name], after[s.name]) > CHECK_RTOL
        )
        out[peer] = {"changed": moved, "missing": gone}
    return out


def relative_change(before: np.ndarray, after: np.ndarray | None) -> float:
    """``max|a − b| / max|b|`` (``inf`` when the site is gone)."""
    if after is None or np.shape(after) != np.shape(before):
        return float("inf")
    scale = max(float(np.max(np.abs(before))) if np.size(before) else 0.0, 1e-30)
    return float(np.max(np.abs(after - before))) / scale if np.size(before) else 0.0


def site_values(
    proto: Any, sites: Sequence[Site], feeds: Mapping[str, np.ndarray], folder: Path
) -> dict[str, np.ndarray]:
    """Per site what its quantization depends on: a stored tensor's values, an activation's
    ``[min, max]`` over ``feeds`` (its MinMax range; the graph made to output it)."""
    import onnx
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    out = {s.name: numpy_helper.to_array(inits[s.name]).astype(np.float64)
           for s in sites if s.kind != "activation" and s.name in inits}  # fmt: skip
    acts = sorted({s.name for s in sites if s.kind == "activation"})
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    known = {o.name for o in model.graph.output}
    produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    for name in acts:
        if name in produced and name not in known:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
    path = folder / "sites.onnx"
    onnx.save(model, str(path))
    names = [o.name for o in model.graph.output]
    results = run_batches(path, dict(feeds), batch=8)
    for name, r in zip(names, results):
        if name in acts:
            r64 = np.asarray(r, np.float64)
            out[name] = np.array([r64.min(), r64.max()])
    return out


# -- one model -----------------------------------------------------------------------------------
def certify(
    name: str, cache: Path, n_held: int, modes: Sequence[str], draws: int
) -> dict[str, Any]:
    """Per mode: the fixed sites, the certificate model's SQNR and task metric on held-back
    inputs, and the check of the selection (module docstring)."""
    import onnx

    from experiments.quant_models import tasks

    (task,) = tasks(cache, [name], 32, n_held)
    work = cache / task.name
    work.mkdir(parents=True, exist_ok=True)
    prepared_path = work / "prepared.onnx"
    if not prepared_path.is_file():
        prepare(task.path, prepared_path)
    shapes = {k: (1, *v.shape[1:]) for k, v in task.calibration.items()}
    out: dict[str, Any] = {"model": name, "held_back": n_held}
    with tempfile.TemporaryDirectory(prefix="gt-cert-") as tmp:
        folder = Path(tmp)
        qpath = folder / "q.onnx"
        quantize(prepared_path, qpath, task.calibration, False, task.quantize_ops)
        prepared = onnx.load(str(prepared_path))
        sites = read_sites(onnx.load(str(qpath)), prepared, None)
        ref = run_batches(prepared_path, task.held_back)
        out["fp32_metric"] = task.metric(ref, ref)
        out["sites"] = len(sites)
        out["all_sites"] = evaluate(task, prepared, sites, ref, folder)
        for mode in modes:
            start = time.perf_counter()
            model, analysis = orbit_analysis(prepared_path, shapes, mode)
            fixed = fixed_sites(model, analysis, sites)
            keys = {(s.name, s.kind) for s in fixed}
            others = [s for s in sites if (s.name, s.kind) not in keys]
            entry = {
                "fixed": len(fixed),
                "fixed_by_kind": count_kinds(fixed),
                "sites_by_kind": count_kinds(sites),
                "free_pairs": int(np.sum(analysis.solution.free)),
                **evaluate(task, prepared, fixed, ref, folder),
            }
            log.info("%s %s: %d of %d sites fixed: %.2f dB, metric %.4g", name, mode,
                     len(fixed), len(sites), entry["sqnr_db"], entry["metric"])  # fmt: skip
            if draws:
                calib = {k: v[:8] for k, v in task.calibration.items()}
                entry["check"] = check_fixed(
                    model, shapes, fixed, others, calib, mode, draws, folder
                )
                log.info("  check: %s", entry["check"])
            if mode == "absorb":
                calib = {k: v[:8] for k, v in task.calibration.items()}
                entry["peers"] = check_peers(prepared, work, fixed, calib, folder)
                log.info("  peers: %s", entry["peers"])
            entry["seconds"] = time.perf_counter() - start
            entry["fixed_names"] = sorted(f"{s.kind}:{s.name}" for s in fixed)
            out[mode] = entry
    return out


def evaluate(
    task: Any, prepared: Any, sites: Sequence[Site], ref: list[np.ndarray], folder: Path
) -> dict[str, Any]:
    """The prepared model with only ``sites`` quantized: SQNR against FP32 and the task
    metric on the held-back inputs."""
    import onnx

    path = folder / "cert.onnx"
    onnx.save(with_sites(prepared, sites), str(path))
    got = run_batches(path, task.held_back)
    return {"sqnr_db": sqnr_db(ref, got), "metric": task.metric(got, ref)}


def count_kinds(sites: Sequence[Site]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for s in sites:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
    return kinds


# -- the document's section ----------------------------------------------------------------------
def section(results: dict[str, Any]) -> str:
    """Per model and mode: the fixed sites, the certificate model's SQNR and metric, the
    check, and the verdict against "within 1 point of FP32"."""
    if not results:
        return "(not run: `python -m experiments.quant_certificate ocr_rec`)"
    head = (
        "| model | mode | sites fixed (weights / activations / biases / constants) "
        "| certificate model SQNR dB | its metric (FP32) | check: fixed sites moved "
        "/ other sites moved | verdict |\n|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for name, r in results.items():
        for mode in MODES:
            e = r.get(mode)
            if not e:
                continue
            k = e["fixed_by_kind"]
            kinds = " / ".join(
                str(k.get(x, 0)) for x in ("weight", "activation", "bias", "constant")
            )
            c = e.get("check") or {}
            check = (
                f"{len(c['fixed_changed'])} (worst {c['fixed_worst_rel_change']:.0e}) / "
                f"{c['others_changed']} of {c['others']}, {c['draws']} draws"
                if c
                else "not run"
            )
            lost = e["metric"] < r["fp32_metric"] - 1.0
            verdict = (
                "**certificate**: no rescaling of this mode reaches FP32 − 1"
                if lost
                else "no certificate (the fixed sites alone keep the accuracy)"
            )
            lines.append(
                f"| {name} | {mode} | {e['fixed']} of {r['sites']} ({kinds}) "
                f"| {e['sqnr_db']:.2f} | {e['metric']:.1f} ({r['fp32_metric']:.1f}) "
                f"| {check} | {verdict} |"
            )
    every = "; ".join(
        f"{n}: every site quantized (float fake-quant) {r['all_sites']['sqnr_db']:.2f} dB, "
        f"{r['all_sites']['metric']:.1f} ({r['held_back']} held-back inputs, "
        f"{r['seconds']:.0f} s, {r['date']})"
        for n, r in results.items()
    )
    peers = "; ".join(
        f"{n}: "
        + ", ".join(
            f"{peer} changed {len(v['changed'])} and lacks {len(v['missing'])}"
            for peer, v in r["absorb"]["peers"].items()
        )
        for n, r in results.items()
        if r.get("absorb", {}).get("peers")
    )
    peers = (
        f"  The peers' equalized models, of the absorb-mode fixed sites: {peers}." if peers else ""
    )
    return "\n".join(lines) + f"\n\nFor scale: {every}.{peers}"


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--held-back", type=int, default=128)
    p.add_argument("--check", type=int, default=2, help="random rescalings checked per mode")
    p.add_argument("--cache", default=str(ROOT / "experiments" / ".cache" / "quantization"))
    p.add_argument("--json", default=str(OUT))
    args = p.parse_args(argv)
    out = Path(args.json)
    results = read_results(out)
    for name in args.models:
        start = time.perf_counter()
        results[name] = certify(name, Path(args.cache), args.held_back, args.modes, args.check)
        results[name]["seconds"] = time.perf_counter() - start
        results[name]["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        write_results(out, results, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
