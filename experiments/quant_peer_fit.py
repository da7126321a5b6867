"""A peer's cross-layer equalization read as cofactors on graphteleport's orbit, class by class
against ``equalize`` (docs/quantization.md, "Why Quark scored 1.6 dB more on the classifier").

For a model of ``experiments.quantization`` whose cache holds the prepared FP32 model and a
peer's output (``PEER.fp32.onnx``), fit per cofactor pair ``u = log t`` so that every counted
row of the prepared model's weights, scaled by ``exp(A·u)``, matches the peer's (dense
least squares over the movable pairs on ``log(M₁(peer row) / M₁(row))``,
:class:`graphteleport.orbit.OrbitTerms` with p = 1; absorb mode, Clips kept as they are,
since the peers keep them).  A residual
near float32 rounding means the peer's result *is* a point of the orbit.  Then, per class
(the pairs first reached by one value, in graph order): how many pairs the peer and
``equalize`` cle (p = 3, on the same analysis) move, and the median ``|log t|`` of each.

Run (after ``python -m experiments.quantization --models ocr_cls``)::

    python -m experiments.quant_peer_fit ocr_cls quark
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from graphteleport.analysis import AnalysisResult, analyze_model
from graphteleport.orbit import OrbitTerms, movable_pairs, stored_arrays
from graphteleport.passes.equalize import cle_values

CACHE = Path(__file__).resolve().parent / ".cache" / "quantization"


def fit_u(analysis: AnalysisResult, peer: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
    """The pair values ``u`` fitting ``peer``'s weights, and the largest residual in log."""
    arrays = stored_arrays(analysis)
    moved = {n: peer.get(n, a) for n, a in arrays.items()}
    before = OrbitTerms.build(analysis, p=1, arrays=arrays)
    after = OrbitTerms.build(analysis, p=1, arrays=moved)
    rows, cols, coef = before.coordinates
    ok = (before.q > 0) & (after.q > 0)
    keep = np.flatnonzero(movable_pairs(analysis))  # the other pairs have no column
    column = np.full(analysis.solution.num_pairs, -1)
    column[keep] = np.arange(keep.size)
    a = np.zeros((before.q.size, keep.size))
    np.add.at(a, (rows, column[cols]), coef)
    b = np.log(after.q[ok] / before.q[ok])
    fit = np.linalg.lstsq(a[ok], b, rcond=None)[0]
    u = np.zeros(analysis.solution.num_pairs)
    u[keep] = fit
    return u, float(np.abs(a[ok] @ fit - b).max(initial=0.0))


def classes(model: ir.Model, analysis: AnalysisResult) -> tuple[np.ndarray, list[str]]:
    """Per pair, the index of the first value (graph order) whose neurons reach it (−1:
    not movable), and those values' names."""
    movable = movable_pairs(analysis)
    owner = np.full(analysis.solution.num_pairs, -1)
    names: list[str] = []
    for node in model.graph:
        for v in node.outputs:
            ids = analysis.neurons.get(v.name)
            if ids is None:
                continue
            pairs = analysis.solution.pair[np.asarray(ids).reshape(-1)]
            new = pairs[(owner[pairs] < 0) & movable[pairs]]
            if new.size:
                owner[new] = len(names)
                names.append(f"{node.op_type} → {v.name}")
    return owner, names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("model", help="a model of experiments.quantization (its cache folder)")
    parser.add_argument("peer", help="the variant key of the peer's row (quark, aimet, onnxsim)")
    args = parser.parse_args(argv)
    work = CACHE / args.model
    model = ir.load(str(work / "prepared.onnx"))
    analysis = analyze_model(model)
    peer = {
        t.name: onnx.numpy_helper.to_array(t)
        for t in onnx.load(work / f"{args.peer}.fp32.onnx").graph.initializer
    }
    u_peer, residual = fit_u(analysis, peer)
    u_cle = np.log(cle_values(analysis, 3.0)[0])
    owner, names = classes(model, analysis)
    moved_peer, moved_cle = np.abs(u_peer) > 1e-6, np.abs(u_cle) > 1e-6
    print(f"{args.model}: {args.peer} as cofactors, largest log residual {residual:.1e}")
    print(
        f"pairs moved: {args.peer} {moved_peer.sum()}, cle {moved_cle.sum()}, both "
        f"{(moved_peer & moved_cle).sum()} of {int(movable_pairs(analysis).sum())} movable"
    )
    print(
        f"| class (first value) | pairs | {args.peer} moves | cle moves | "
        f"median abs log t {args.peer} | cle |"
    )
    print("|---|---|---|---|---|---|")
    for k, name in enumerate(names):
        m = owner == k
        print(
            f"| `{name}` | {m.sum()} | {moved_peer[m].mean():.0%} | {moved_cle[m].mean():.0%} "
            f"| {np.median(np.abs(u_peer[m])):.2f} | {np.median(np.abs(u_cle[m])):.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
