"""Shared helpers for the rule, pass, CLI and property tests.

* ``make_model`` builds tiny ONNX graphs with :mod:`onnx.helper` (no torch);
* ``run_ort`` / ``max_rel_err`` run models in onnxruntime with graph optimisations off;
* ``teleport`` runs :class:`TeleportPass` on a copy of a proto and keeps what the checks need
  (the weights before and after, the per-value cofactors τ);
* ``exported`` is a session cache of registry architectures exported to ONNX (torch needed).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from graphteleport.analysis import Solution  # noqa: E402
from graphteleport.passes.teleport import TeleportPass, TeleportResult  # noqa: E402

IR_VERSION = {11: 6, 13: 7, 17: 8, 18: 8}
RTOL = 1e-5


# -- building tiny graphs -----------------------------------------------------------------------
def rand(shape: Sequence[int], seed: int = 0, low: float | None = None) -> np.ndarray:
    """Standard-normal float32 (or U[low, low + 1] when ``low`` is given)."""
    rng = np.random.default_rng(seed)
    if low is not None:
        return (rng.random(tuple(shape)) + low).astype(np.float32)
    return rng.standard_normal(tuple(shape)).astype(np.float32)


def tensor_info(name: str, shape: Sequence[int | str | None] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Mapping[str, Sequence[int | str | None]],
    outputs: Mapping[str, Sequence[int | str | None] | None],
    initializers: Mapping[str, np.ndarray] | None = None,
    *,
    opset: int = 17,
    domains: Mapping[str, int] | None = None,
    value_info: Mapping[str, Sequence[int]] | None = None,
) -> onnx.ModelProto:
    """A checked float32 model: ``inputs``/``outputs`` map names to shapes."""
    graph = helper.make_graph(
        list(nodes),
        "tiny",
        [tensor_info(n, s) for n, s in inputs.items()],
        [tensor_info(n, s) for n, s in outputs.items()],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in (initializers or {}).items()],
        value_info=[tensor_info(n, s) for n, s in (value_info or {}).items()],
    )
    opsets = [helper.make_opsetid("", opset)]
    opsets += [helper.make_opsetid(d, v) for d, v in (domains or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION.get(opset, 8))
    if not domains:
        onnx.checker.check_model(model, full_check=True)
    return model


def const_node(name: str, array: np.ndarray) -> onnx.NodeProto:
    """A Constant node producing ``name``."""
    return helper.make_node(
        "Constant",
        [],
        [name],
        name=f"const_{name}",
        value=numpy_helper.from_array(np.asarray(array), name),
    )


# -- running --------------------------------------------------------------------------------
def _bytes(model: onnx.ModelProto | ir.Model) -> bytes:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    return proto.SerializeToString()


def run_ort(model: onnx.ModelProto | ir.Model, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of ``model`` in onnxruntime (CPU, graph optimisations off)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(_bytes(model), options, providers=["CPUExecutionProvider"])
    return list(session.run(None, dict(feeds)))


def random_feeds(model: onnx.ModelProto | ir.Model, seed: int = 1) -> dict[str, np.ndarray]:
    """Standard-normal inputs of the declared (static) shapes."""
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    inits = {i.name for i in proto.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def max_rel_err(
    a: onnx.ModelProto | ir.Model,
    b: onnx.ModelProto | ir.Model,
    feeds: Mapping[str, np.ndarray] | None = None,
) -> float:
    """``max |a − b| / max |a|`` over every output (the scale of each output its own)."""
    feeds = random_feeds(a) if feeds is None else feeds
    worst = 0.0
    for x, y in zip(run_ort(a, feeds), run_ort(b, feeds), strict=True):
        assert x.shape == y.shape
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        scale = max(float(np.max(np.abs(x64), initial=0.0)), 1e-30)
        worst = max(worst, float(np.max(np.abs(x64 - y64), initial=0.0)) / scale)
    return worst


def max_abs_err(a: Any, b: Any, feeds: Mapping[str, np.ndarray] | None = None) -> float:
    feeds = random_feeds(a) if feeds is None else feeds
    return max(
        float(np.max(np.abs(x.astype(np.float64) - y), initial=0.0))
        for x, y in zip(run_ort(a, feeds), run_ort(b, feeds), strict=True)
    )


# -- weights --------------------------------------------------------------------------------
def weights(model: onnx.ModelProto | ir.Model) -> dict[str, np.ndarray]:
    """Every float constant by name: initializers and Constant-node values."""
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    out = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(a.t)
    return {k: v for k, v in out.items() if v.dtype.kind == "f"}


def changed_elements(
    before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]
) -> tuple[int, int]:
    """(changed, total) float weight elements of ``before`` (a reshaped or missing tensor
    counts as wholly changed)."""
    changed = total = 0
    for name, w in before.items():
        total += w.size
        w2 = after.get(name)
        if w2 is None or w2.shape != w.shape:
            changed += w.size
        else:
            changed += int(np.count_nonzero(w2 != w))
    return changed, total


def changed_names(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]) -> set[str]:
    return {
        n
        for n, w in before.items()
        if n not in after or after[n].shape != w.shape or not np.array_equal(after[n], w)
    }


# -- teleporting ----------------------------------------------------------------------------
@dataclass
class Teleported:
    """A proto teleported by :class:`TeleportPass`, with what the checks need."""

    before: onnx.ModelProto
    model: ir.Model
    result: TeleportResult
    w0: dict[str, np.ndarray]
    w1: dict[str, np.ndarray]

    @property
    def solution(self) -> Solution:
        assert self.result.analysis is not None
        return self.result.analysis.solution

    @property
    def free_values(self) -> np.ndarray:
        """The drawn value of every free cofactor pair."""
        return self.result.pair_values[self.solution.free]

    @property
    def after(self) -> onnx.ModelProto:
        return ir.to_proto(self.model)

    def tau(self, value_name: str) -> np.ndarray:
        """Per-neuron τ of a value, in its compact layout (size-1 broadcast axes)."""
        assert self.result.analysis is not None
        neurons = self.result.analysis.neurons
        if value_name not in neurons:
            raise KeyError(f"{value_name!r} carries no neurons")
        return self.result.tau[neurons[value_name]]

    def rel_err(self, feeds: Mapping[str, np.ndarray] | None = None) -> float:
        return max_rel_err(self.before, self.after, feeds)

    @property
    def changed(self) -> set[str]:
        return changed_names(self.w0, self.w1)


def teleport(proto: onnx.ModelProto, **kwargs: Any) -> Teleported:
    """Teleport a copy of ``proto`` (seed 0 unless given)."""
    kwargs.setdefault("seed", 0)
    model = ir.from_proto(proto)
    result = TeleportPass(**kwargs)(model)
    return Teleported(proto, model, result, weights(proto), weights(model))


# -- exported registry architectures (torch) -------------------------------------------------
class ExportCache:
    """Each (architecture, exporter, fold_bn) exported once per session, on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._paths: dict[tuple[str, str, bool], Path] = {}

    def __call__(
        self, arch: str, exporter: Literal["dynamo", "legacy"] = "dynamo", fold_bn: bool = True
    ) -> Path:
        key = (arch, exporter, fold_bn)
        if key not in self._paths:
            from models.architectures import ARCHITECTURES
            from models.export import export

            model, shape = ARCHITECTURES[arch]()
            path = self.root / f"{arch}-{exporter}-{'fold' if fold_bn else 'keep'}.onnx"
            export(model, shape, path, exporter=exporter, fold_bn=fold_bn)
            self._paths[key] = path
        return self._paths[key]


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> ExportCache:
    """``exported(arch, exporter, fold_bn) -> Path`` (skips when torch is missing)."""
    pytest.importorskip("torch")
    return ExportCache(tmp_path_factory.mktemp("exported"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    from models import FIXTURES_DIR

    return FIXTURES_DIR


FIXTURE_NAMES = ("mlp_small", "resnet_tiny", "cnn_tiny_keepbn")


def gemm_mlp(
    widths: Sequence[int],
    activations: Iterable[str] | str = "Relu",
    *,
    batch: int = 2,
    bias: bool = True,
    seed: int = 0,
    opset: int = 17,
    trans_b: int = 0,
) -> onnx.ModelProto:
    """x[batch, widths[0]] → (Gemm, act) × … → Gemm → y[batch, widths[-1]].

    ``activations`` names one op per hidden layer (or one for all); "" for none.
    """
    hidden = len(widths) - 2
    acts = [activations] * hidden if isinstance(activations, str) else list(activations)
    nodes, inits = [], {}
    cur = "x"
    for k in range(len(widths) - 1):
        fan_in, fan_out = widths[k], widths[k + 1]
        shape = (fan_out, fan_in) if trans_b else (fan_in, fan_out)
        inits[f"W{k}"] = rand(shape, seed + 10 * k) / np.float32(np.sqrt(fan_in))
        ins = [cur, f"W{k}"]
        if bias:
            inits[f"b{k}"] = rand((fan_out,), seed + 10 * k + 1)
            ins.append(f"b{k}")
        out = "y" if k == len(widths) - 2 else f"h{k}"
        nodes.append(helper.make_node("Gemm", ins, [out], name=f"fc{k}", transB=trans_b))
        cur = out
        if out != "y" and acts[k]:
            nodes.append(helper.make_node(acts[k], [cur], [f"a{k}"], name=f"act{k}"))
            cur = f"a{k}"
    return make_model(
        nodes, {"x": [batch, widths[0]]}, {"y": [batch, widths[-1]]}, inits, opset=opset
    )


Builder = Callable[..., onnx.ModelProto]


def signalled_child(
    code: str,
    args: Sequence[str],
    cwd: Path,
    ready: str,
    sig: signal.Signals,
    before_signal: Callable[[], None] = lambda: None,
) -> tuple[int, str]:
    """Run ``python -c code *args`` in ``cwd`` (the repository importable), wait until its
    stdout prints the line ``ready``, call ``before_signal``, send ``sig``; its exit code
    and stderr.  The child is killed if anything fails on the way."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        up, _, _ = select.select([child.stdout], [], [], 120)
        assert up and child.stdout.readline().strip() == ready, child.stderr
        before_signal()
        child.send_signal(sig)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return child.returncode, err


class CountingOpen:
    """A stand-in for ``graphteleport.verify.open_proto`` that counts the runs of the
    sessions it opens and the largest axis 0 fed (patch it in with monkeypatch)."""

    def __init__(self) -> None:
        from graphteleport import verify

        self.runs = 0
        self.widest = 0
        self.open = verify.open_proto

    def __call__(self, proto: onnx.ModelProto, folder: str) -> Any:
        run = self.open(proto, folder)

        def counted(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
            self.runs += 1
            sizes = [v.shape[0] for v in feeds.values() if v.ndim]
            self.widest = max(self.widest, *sizes, 0)
            return run(feeds)

        counted.output_names = run.output_names  # type: ignore[attr-defined]
        return counted
