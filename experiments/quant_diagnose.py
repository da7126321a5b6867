"""Where per-tensor INT8 loses a model's output: one quantized tensor at a time (issue 14,
Done-when 2, the diagnosis of the models no equalization helped).

For a model of ``experiments.quant_models`` this quantizes it with the harness's own
``quantize_static`` settings (:func:`experiments.quantization.quantize`: QDQ, MinMax on the
same calibration batch, weights QInt8 symmetric per tensor, activations QUInt8), reads every
*site* the quantizer chose out of the QDQ model — an activation (a ``QuantizeLinear`` on a
value), a weight (an INT8 initializer), a bias (INT32) or a constant quantized as an
activation (UINT8 initializer) — with its scale and zero point, and puts each back into the
*FP32* model on its own: the prepared model with only that value quantized-dequantized
(a weight replaced by its dequantized values).  The SQNR of that model's outputs against
FP32 on held-back inputs gives the site's own noise ``N_s = P / 10^(SQNR/10)`` (``P``: the
outputs' power); the table ranks the sites by ``N_s`` and gives each as a share of
``Σ N_s`` (the noises add when they are small and independent; the all-sites SQNR is shown
beside it).  Sites are first measured by group (the producer op → the consumer ops) and
then one by one inside the groups that carry most of the noise.

Per weight site also the SQNR with that weight alone per channel (the per-channel row's
scales), and per site whether rescaling can reach it: the share of the tensor's channels
(a weight: its output channels) whose cofactor class is free and movable in graphteleport's
analysis (absorb mode).  A site whose channels are all pinned is one no rescaling changes.

Run::

    python -m experiments.quant_diagnose ocr_rec minilm   # experiments/results/quant_diagnose.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from experiments.quantization import (
    ROOT,
    prepare,
    quantize,
    read_results,
    run_batches,
    sqnr_db,
    write_results,
)

OUT = ROOT / "experiments" / "results" / "quant_diagnose.json"
log = logging.getLogger("experiments.quant_diagnose")


@dataclass
class Site:
    """One value the quantizer quantizes: ``name`` in the prepared model, ``kind``
    (activation, weight, bias, constant), its ``scale``/``zero_point`` (activations), or its
    dequantized values (initializers); ``group``: producer → consumers."""

    name: str
    kind: str
    group: str
    scale: Any = None
    zero_point: Any = None
    values: Any = None
    per_channel_values: Any = None
    sqnr_db: float | None = None
    sqnr_per_channel_db: float | None = None
    movable: float | None = None
    channels: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def strip(name: str, suffixes: Sequence[str]) -> str:
    for s in suffixes:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def read_sites(qdq: Any, prepared: Any, per_channel: Any | None) -> list[Site]:
    """The sites of QDQ model ``qdq`` that exist in ``prepared`` (see the module docstring)."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    pc_inits = (
        {t.name: numpy_helper.to_array(t) for t in per_channel.graph.initializer}
        if per_channel is not None
        else {}
    )
    p_inits = {t.name for t in prepared.graph.initializer}
    values = {o for n in prepared.graph.node for o in n.output} | {
        i.name for i in prepared.graph.input
    }
    producer = {o: n.op_type for n in prepared.graph.node for o in n.output}
    consumers: dict[str, set[str]] = defaultdict(set)
    for n in prepared.graph.node:
        for i in n.input:
            consumers[i].add(n.op_type)
    outputs = {o.name for o in prepared.graph.output}

    def group(name: str, kind: str) -> str:
        src = producer.get(name, "input" if kind == "activation" else kind)
        dst = sorted(consumers.get(name, set())) + (["OUTPUT"] if name in outputs else [])
        return f"{src} → {'/'.join(dst)}"

    sites: list[Site] = []
    for n in qdq.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            name = strip(n.input[0], ["_QuantizeLinear_Input"])
            if name in values:
                sites.append(
                    Site(name, "activation", group(name, "activation"),
                         inits[n.input[1]], inits[n.input[2]] if len(n.input) > 2 else None)
                )  # fmt: skip
        elif n.op_type == "DequantizeLinear" and n.input[0] in inits:
            name = strip(n.input[0], ["_quantized"])
            if name not in p_inits:
                continue
            q = inits[n.input[0]].astype(np.float64)
            kind = {np.dtype(np.int8): "weight", np.dtype(np.int32): "bias"}.get(
                inits[n.input[0]].dtype, "constant"
            )
            site = Site(name, kind, group(name, kind), values=dequantize(q, n, inits))
            pc = (
                pc_dequantized(per_channel, n.input[0], pc_inits)
                if kind == "weight" and per_channel is not None
                else None
            )
            site.per_channel_values = pc
            sites.append(site)
    return dedupe(sites)


def dequantize(q: np.ndarray, node: Any, inits: dict[str, np.ndarray]) -> np.ndarray:
    """``(q − zp) · scale`` of a DequantizeLinear (per tensor or along its ``axis``)."""
    scale = inits[node.input[1]].astype(np.float64)
    zp = inits[node.input[2]].astype(np.float64) if len(node.input) > 2 else np.zeros(1)
    if scale.size > 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((q - zp) * scale).astype(np.float32)


def pc_dequantized(model: Any, qname: str, inits: dict[str, np.ndarray]) -> np.ndarray | None:
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] == qname:
            return dequantize(inits[qname].astype(np.float64), n, inits)
    return None


def dedupe(sites: list[Site]) -> list[Site]:
    """One site per (name, kind): a value quantized once per consumer is one site."""
    seen: dict[tuple[str, str], Site] = {}
    for s in sites:
        seen.setdefault((s.name, s.kind), s)
    return list(seen.values())


def with_sites(prepared: Any, sites: Sequence[Site], per_channel: bool = False) -> Any:
    """A copy of ``prepared`` with ``sites`` quantized-dequantized: an activation gets a
    ``QuantizeLinear → DequantizeLinear`` right after its producer (its readers, graph
    outputs included, see the quantized value), an initializer its dequantized values."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(prepared)
    g = model.graph
    by_init = {t.name: i for i, t in enumerate(g.initializer)}
    acts = {}
    for s in sites:
        if s.kind == "activation":
            acts[s.name] = s
            continue
        vals = (
            s.per_channel_values if per_channel and s.per_channel_values is not None else s.values
        )
        old = g.initializer[by_init[s.name]]
        arr = vals.astype(numpy_helper.to_array(old).dtype).reshape(
            numpy_helper.to_array(old).shape
        )
        g.initializer[by_init[s.name]].CopyFrom(numpy_helper.from_array(arr, s.name))
    inputs = {i.name for i in g.input}
    nodes = []

    def qdq(src: str, dst: str, s: Site) -> list[Any]:
        sc, zp = f"{s.name}__diag_scale", f"{s.name}__diag_zp"
        g.initializer.extend(
            [numpy_helper.from_array(np.asarray(s.scale), sc),
             numpy_helper.from_array(np.asarray(s.zero_point), zp)]
        )  # fmt: skip
        return [
            helper.make_node("QuantizeLinear", [src, sc, zp], [f"{s.name}__diag_q"]),
            helper.make_node("DequantizeLinear", [f"{s.name}__diag_q", sc, zp], [dst]),
        ]

    for name in [n for n in acts if n in inputs]:  # a graph input: rewire its readers
        nodes += qdq(name, f"{name}__diag_dq", acts[name])
    renamed = {n: f"{n}__diag_dq" for n in acts if n in inputs}
    for node in g.node:
        for k, i in enumerate(node.input):
            if i in renamed:
                node.input[k] = renamed[i]
        nodes.append(node)
        for k, o in enumerate(node.output):
            if o in acts:
                node.output[k] = f"{o}__diag_f"
                nodes += qdq(f"{o}__diag_f", o, acts[o])
    del g.node[:]
    g.node.extend(nodes)
    return model


class Evaluator:
    """SQNR against the prepared model's outputs on held-back feeds, of models built by
    :func:`with_sites` (saved to a temporary folder, run by the harness's runner)."""

    def __init__(self, prepared: Any, feeds: dict[str, np.ndarray], folder: Path) -> None:
        import onnx

        self.prepared, self.feeds, self.folder = prepared, feeds, folder
        path = folder / "ref.onnx"
        onnx.save(prepared, str(path))
        self.ref = run_batches(path, feeds)
        self.runs = 0

    def sqnr(self, sites: Sequence[Site], per_channel: bool = False) -> float:
        import onnx

        path = self.folder / "probe.onnx"
        onnx.save(with_sites(self.prepared, sites, per_channel), str(path))
        self.runs += 1
        return sqnr_db(self.ref, run_batches(path, self.feeds))


def movable_share(
    prepared_path: Path, sites: list[Site], shapes: dict[str, tuple[int, ...]]
) -> None:
    """Per site, the share of its channels in movable cofactor classes (absorb mode):
    an activation's neurons; a weight's or bias's output channels (the neurons of the
    value its node writes)."""
    import onnx_ir as ir

    from graphteleport.analysis import analyze_model
    from graphteleport.orbit import movable_pairs

    model = ir.load(str(prepared_path))
    analysis = analyze_model(model, shapes, "absorb")
    movable = movable_pairs(analysis)
    pair = analysis.solution.pair
    writes = {}
    for node in model.graph:
        for v in node.inputs:
            if v is not None and v.name and node.outputs:
                writes.setdefault(v.name, node.outputs[0].name)
    for s in sites:
        value = s.name if s.kind == "activation" else writes.get(s.name)
        ids = analysis.neurons.get(value or "")
        if ids is None:
            s.movable, s.channels = 0.0, 0
            continue
        flat = np.asarray(ids).reshape(-1)
        s.movable = float(np.mean(movable[pair[flat]])) if flat.size else 0.0
        s.channels = int(flat.size)


def noise(p_db: float) -> float:
    return 0.0 if np.isinf(p_db) else 10.0 ** (-p_db / 10.0)


def diagnose(name: str, cache: Path, n_held: int, per_group: int) -> dict[str, Any]:
    import onnx

    from experiments.quant_models import tasks

    (task,) = tasks(cache, [name], 32, max(n_held, 1))
    work = cache / task.name
    work.mkdir(parents=True, exist_ok=True)
    prepared_path = work / "prepared.onnx"
    if not prepared_path.is_file():
        prepare(task.path, prepared_path)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gt-diag-") as tmp:
        folder = Path(tmp)
        qpath, pcpath = folder / "q.onnx", folder / "pc.onnx"
        quantize(prepared_path, qpath, task.calibration, False, task.quantize_ops)
        quantize(prepared_path, pcpath, task.calibration, True, task.quantize_ops)
        prepared = onnx.load(str(prepared_path))
        sites = read_sites(onnx.load(str(qpath)), prepared, onnx.load(str(pcpath)))
        feeds = {k: v[:n_held] for k, v in task.held_back.items()}
        ev = Evaluator(prepared, feeds, folder)
        result = measure(ev, sites, per_group)
    shapes = {k: (1, *v.shape[1:]) for k, v in task.calibration.items()}
    movable_share(prepared_path, sites, shapes)
    result["sites"] = [site_json(s) for s in sites if s.sqnr_db is not None]
    result["sites"].sort(key=lambda s: -s["noise"])
    total = sum(s["noise"] for s in result["sites"]) or 1.0
    for s in result["sites"]:
        s["share"] = s["noise"] / total
    result.update(model=name, held_back=n_held, seconds=time.perf_counter() - start, runs=ev.runs)
    return result


def measure(ev: Evaluator, sites: list[Site], per_group: int) -> dict[str, Any]:
    """All sites, per kind, per group; then each site of the groups that carry most noise
    (at most ``per_group`` sites per group, the largest tensors first when cut)."""
    out: dict[str, Any] = {"all_sqnr_db": ev.sqnr(sites)}
    out["all_per_channel_sqnr_db"] = ev.sqnr(sites, per_channel=True)
    kinds = sorted({s.kind for s in sites})
    out["kinds"] = {k: ev.sqnr([s for s in sites if s.kind == k]) for k in kinds}
    out["weights_per_channel_sqnr_db"] = ev.sqnr([s for s in sites if s.kind == "weight"], True)
    groups: dict[str, list[Site]] = defaultdict(list)
    for s in sites:
        groups[f"{s.kind}: {s.group}"].append(s)
    out["groups"] = {g: {"sites": len(m), "sqnr_db": ev.sqnr(m)} for g, m in groups.items()}
    ranked = sorted(out["groups"], key=lambda g: -noise(out["groups"][g]["sqnr_db"]))
    total = sum(noise(v["sqnr_db"]) for v in out["groups"].values()) or 1.0
    covered = 0.0
    for g in ranked:
        if covered > 0.9:
            break
        covered += noise(out["groups"][g]["sqnr_db"]) / total
        members = groups[g]
        if len(members) > per_group:
            members = sorted(members, key=lambda s: -site_size(s))[:per_group]
        for s in members:
            s.sqnr_db = ev.sqnr([s])
            if s.kind == "weight" and s.per_channel_values is not None:
                s.sqnr_per_channel_db = ev.sqnr([s], per_channel=True)
        log.info("  group %s: %.2f dB (%d sites)", g, out["groups"][g]["sqnr_db"], len(members))
    return out


def site_size(s: Site) -> int:
    return int(np.size(s.values)) if s.values is not None else 0


def site_json(s: Site) -> dict[str, Any]:
    d = asdict(s)
    for k in ("scale", "zero_point", "values", "per_channel_values"):
        d.pop(k)
    d["noise"] = noise(s.sqnr_db) if s.sqnr_db is not None else 0.0
    if s.kind == "activation":
        zp, scale = float(s.zero_point), float(s.scale)
        d["range"] = [(0 - zp) * scale, (255 - zp) * scale]
    return d


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--held-back", type=int, default=16)
    p.add_argument("--per-group", type=int, default=24)
    p.add_argument("--cache", default=str(ROOT / "experiments" / ".cache" / "quantization"))
    p.add_argument("--json", default=str(OUT))
    args = p.parse_args(argv)
    out = Path(args.json)
    results = read_results(out)
    for name in args.models:
        log.info("%s", name)
        results[name] = diagnose(name, Path(args.cache), args.held_back, args.per_group)
        write_results(out, results, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
