"""Which candidate should ``equalize --method auto`` fall back on: each candidate's score on
the calibration batch (what ``auto`` sees) against its INT8 output SQNR on held-back inputs
(what Done-when 2 judges), per trained model (issue 14).

``auto`` keeps its best-scoring candidate only where the calibration feeds separate it from
a data-free default (:func:`graphteleport.passes.equalize.significant_best`); elsewhere the
default is the result, so the default should be the candidate that does best on held-back
data where the calibration batch cannot tell.  For every model of
``experiments.quant_models`` this reads each candidate's simulated calibration SQNR from the
report of the harness's ``equalize auto`` row (``experiments.quantization``: run it first),
then writes each candidate as a model of its own with ``graphteleport equalize`` (``--method
cle --p P``, ``--method smooth --alpha A``, ``--method cle --mode insert --p P``; "none" is
the model as is) and measures it exactly like the harness's rows: onnxruntime's
``quantize_static`` (QDQ, MinMax on the same calibration batch, per-tensor INT8 weights),
output SQNR and task metric on the held-back inputs.  Transforms and measurements are cached
beside the harness's (``autorule_cache.json`` in each model's folder; the harness's own
measurements are reused where a candidate writes the same graph).

Run::

    python -m experiments.quant_autorule            # experiments/results/quant_autorule.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.quantization import (
    AUTO_TIMEOUT_S,
    RESULTS,
    ROOT,
    Cache,
    Variant,
    equalize_available,
    equalize_src,
    measure_variant,
    read_results,
    task_context,
    write_results,
)
from graphteleport.passes.equalize import DEFAULT_P, auto_names

OUT = RESULTS / "quant_autorule.json"
log = logging.getLogger("experiments.quant_autorule")


def candidate_variants() -> list[tuple[str, Variant]]:
    """``(auto's candidate name, the harness variant that writes it)`` for every candidate:
    ``equalize --method auto --auto-candidates NAME``, the model ``auto`` writes when it
    keeps that candidate (its Clips split and joined back as ``auto`` does them)."""
    out = []
    for name in auto_names():
        key = "ar_" + name.replace(" ", "_").replace("=", "")
        args = ("--method", "auto", "--calibration", "{calibration}", "--int8-ops", "{int8_ops}")
        args += ("--auto-candidates", name)
        out.append((name, Variant(key, name, "graphteleport", args, timeout=AUTO_TIMEOUT_S)))
    return out


def calibration_scores(work: Path, key: str = "gt_auto") -> tuple[dict[str, float | None], str]:
    """The simulated calibration SQNR of each candidate and the one chosen, from the report
    of the ``equalize auto`` row ``key`` (default: the harness's; empty when it has not
    run)."""
    report = work / f"{key}.fp32.report.json"
    if not report.is_file():
        return {}, ""
    eq = json.loads(report.read_text()).get("equalize") or {}
    return {n: db for n, db in eq.get("candidates", [])}, eq.get("chosen", "")


def shared_cache(work: Path) -> Cache:
    """This experiment's cache, seeded with the harness's measurements and reference (read
    only: written back to ``autorule_cache.json`` alone)."""
    cache = Cache(work, True, "autorule_cache.json")
    main = Cache(work, True)
    cache.measured = {**main.measured, **cache.measured}
    if main.reference:
        cache.reference = main.reference
    return cache


def run_model(task: Any, cache_dir: Path) -> dict[str, Any]:
    """Every candidate of one model: calibration score, held-back SQNR and metric."""
    ctx, _ = task_context(
        task, cache_dir, equalize_available(equalize_src()), shared_cache(cache_dir / task.name)
    )
    scores, chosen = calibration_scores(ctx.work)
    rows = []
    for name, variant in candidate_variants():
        row = measure_variant(task, variant, ctx)
        log.info("%s %s: calibration %s dB, held-back %s dB (%s)", task.name, name,
                 scores.get(name), row.sqnr_db, row.status)  # fmt: skip
        own, _ = calibration_scores(ctx.work, variant.key)
        rows.append({
            "candidate": name,
            "calibration_db": scores.get(name),
            "calibration_db_alone": own.get(name),
            "held_back_db": row.sqnr_db,
            "metric": row.metric,
            "status": row.status,
            "fp32_rel_err": row.fp32_rel_err,
            "seconds": row.seconds,
            "cached": bool(row.extra.get("cached")),
        })  # fmt: skip
    return {"metric_name": task.metric_name, "chosen": chosen, "rows": rows}


# -- the document's section ----------------------------------------------------------------------
def fmt_db(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def section(results: dict[str, Any]) -> str:
    """The table per model (markdown) and, per candidate, how it ranks on held-back data."""
    if not results:
        return "(not run: `python -m experiments.quant_autorule`)"
    names = [n for n, _ in candidate_variants()]
    head = "| candidate | " + " | ".join(results) + " |"
    lines = [head, "|---|" + "---|" * len(results)]
    for n in names:
        cells = []
        for m in results.values():
            r = next((r for r in m["rows"] if r["candidate"] == n), None)
            if r is None:
                cells.append("—")
                continue
            mark = " ←" if n == m["chosen"] else ""
            cells.append(f"{fmt_db(r['calibration_db'])} / {fmt_db(r['held_back_db'])}{mark}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(default_summary(results))
    return "\n".join(lines)


def default_summary(results: dict[str, Any]) -> str:
    """Per possible default, its held-back SQNR minus the best candidate's, per model, and
    the worst and the mean of them: the default that loses least where ``auto`` keeps it."""
    names = [n for n, _ in candidate_variants()]
    out = [
        "| default | " + " | ".join(results) + " | worst | mean |",
        "|---|" + "---|" * (len(results) + 2),
    ]
    for n in names:
        gaps = []
        for m in results.values():
            held = {r["candidate"]: r["held_back_db"] for r in m["rows"]}
            best = max((v for v in held.values() if v is not None), default=None)
            gaps.append(None if held.get(n) is None or best is None else held[n] - best)
        known = [g for g in gaps if g is not None]
        worst = min(known, default=None)
        mean = sum(known) / len(known) if known and len(known) == len(gaps) else None
        cells = ["—" if g is None else f"{g:+.2f}" for g in [*gaps, worst, mean]]
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    from experiments.quant_models import TASK_NAMES, tasks

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--models", nargs="*", default=list(TASK_NAMES), choices=TASK_NAMES)
    p.add_argument("--cache", default=str(ROOT / "experiments" / ".cache" / "quantization"))
    p.add_argument("--json", default=str(OUT))
    args = p.parse_args(argv)
    out = Path(args.json)
    results = read_results(out)
    start = time.perf_counter()
    for task in tasks(Path(args.cache), args.models, 32, 128):
        results[task.name] = run_model(task, Path(args.cache))
        results[task.name]["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        results = {n: results[n] for n in TASK_NAMES if n in results}
        write_results(out, results)
    log.info("wrote %s in %.0f s (default p = %g)", out, time.perf_counter() - start, DEFAULT_P)
    return 0


if __name__ == "__main__":
    sys.exit(main())
