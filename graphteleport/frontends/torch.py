"""Torch frontend: an ``nn.Module`` to the same graph form as an ONNX file.

:func:`trace` tries ``torch.fx`` first (:mod:`graphteleport.frontends.fx`: milliseconds)
and falls back to :func:`export`, which this module does: the module is traced by
``torch.export`` and translated by torch's own ONNX exporter
(``torch.onnx.export(dynamo=True, optimize=False)``, seconds) into an in-memory onnx_ir
model.  Either way the analysis is the one ONNX files get: one rule table, three
frontends.  Without optimisation the exporter keeps every parameter and buffer as
an initializer named by its ``state_dict`` key (weights a Linear transposes at
run time stay behind a ``Transpose`` node, which the analysis traces back), and
every value is named after the FX node that computes it.

After export, the small constants the exporter builds from other constants (a
bias-free conv's zero bias is ``Expand(CastLike(0, W), Shape(W)[:1])``) are
evaluated once and stored on their values (:func:`fold_glue`), so each analysis of
the trace reads them instead of evaluating the chain again; a convolution's computed
zero bias is dropped altogether (:func:`drop_zero_biases`).  Values computed from a
parameter's or buffer's *elements* are never folded: those change with a teleport.
The graph's shapes, types and constants are indexed once, too
(:func:`graphteleport.analysis.index_graph`); each analysis of the trace starts from a
copy of that index with empty value caches.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir.passes.common import RemoveUnusedNodesPass
from torch import nn

from graphteleport.analysis import GraphIndex, index_graph
from graphteleport.errors import InputError

log = logging.getLogger(__name__)
_QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Silence the exporter's warnings, log lines and progress prints."""
    buffer = io.StringIO()
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(buffer),
            contextlib.redirect_stderr(buffer),
        ):
            warnings.simplefilter("ignore")
            yield buffer
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@dataclass
class TorchGraph:
    """A module's graph form: the onnx_ir model and the tensors behind its initializers."""

    model: ir.Model
    program: Any  # torch.onnx.ONNXProgram (its exported_program is the FX graph)
    tensors: dict[str, torch.Tensor]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    index: GraphIndex | None = None  # shapes, types and constants, indexed at trace time
    # per BatchNorm module path: the per-channel variance of its input in a train-mode
    # forward of the example inputs (``batchnorm_input_variance``)
    bn_var: dict[str, np.ndarray] = field(default_factory=dict)
    # which path traced it: "fx" (graphteleport.frontends.fx, with the GraphModule it
    # translated) or "export" (torch.onnx.export; ``program.exported_program`` is its graph)
    tracer: str = "export"
    fx_module: Any = None  # torch.fx.GraphModule

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            v.name or "": tuple(int(d) for d in v.shape)  # type: ignore[arg-type]
            for v in self.model.graph.inputs
            if v.shape is not None and all(isinstance(d, int) for d in v.shape)
        }


def as_args(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword example inputs from a tensor, a tuple or a dict."""
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    return tuple(example_inputs), {}


def module_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by every name it has (tied ones appear twice)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = p
    for name, b in model.named_buffers(remove_duplicate=False):
        out[name] = b
    return out


TRACERS = ("auto", "fx", "export")


def trace(model: nn.Module, example_inputs: Any, tracer: str = "auto") -> TorchGraph:
    """``model``'s graph form: through ``torch.fx`` (:mod:`graphteleport.frontends.fx`,
    milliseconds) where it translates exactly, else (``tracer="auto"``) through the exporter
    (:func:`export`, seconds); ``tracer`` ``"fx"`` or ``"export"`` takes that path only."""
    if tracer not in TRACERS:
        raise InputError(f"unknown tracer {tracer!r}; choose one of {', '.join(TRACERS)}")
    if tracer != "export":
        from graphteleport.frontends import fx  # (fx builds on this module)

        try:
            return fx.trace_fx(model, example_inputs)
        except fx.Untranslatable as e:
            if tracer == "fx":
                raise InputError(f"torch.fx path: {e}") from e
            log.debug("torch.fx path not taken (%s); tracing with torch.onnx.export", e)
    return export(model, example_inputs)


def export(model: nn.Module, example_inputs: Any) -> TorchGraph:
    """Export ``model`` (in eval mode, restored after) to the graph form."""
    args, kwargs = as_args(example_inputs)
    was_training = model.training
    model.eval()
    try:
        with quiet() as log, torch.no_grad():
            program = torch.onnx.export(
                model, args, kwargs=kwargs or None, dynamo=True, optimize=False, verbose=False
            )
    except Exception as e:
        detail = " ".join(str(e).split())[:300]
        raise InputError(f"torch could not trace the module: {type(e).__name__}: {detail}") from e
    finally:
        model.train(was_training)
    del log
    if program is None:
        raise InputError("torch.onnx.export returned no program")
    tensors = module_tensors(model)
    fold_glue(program.model, set(tensors))
    drop_zero_biases(program.model)
    graph = TorchGraph(program.model, program, tensors, args, kwargs)
    graph.index = index_graph(graph.model, graph.input_shapes)  # reused by every analysis
    graph.bn_var = batchnorm_input_variance(model, args, kwargs)
    return graph


def batchnorm_input_variance(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Per BatchNorm module: the biased per-channel variance of its input in one train-mode
    forward of the example inputs (what training-mode BatchNorm normalises by).

    Nothing of the module changes: its buffers (running statistics), its mode and the
    random number generators are restored afterwards.
    """
    bns = {
        path: m
        for path, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    if not bns:
        return {}
    out: dict[str, np.ndarray] = {}
    reused: set[str] = set()  # a module called twice has no one input variance

    def record(path: str) -> Any:
        def hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].detach()
            dims = [d for d in range(x.dim()) if d != 1]
            if path in out:
                reused.add(path)
            out[path] = x.double().var(dim=dims, unbiased=False).cpu().numpy()

        return hook

    handles = [m.register_forward_pre_hook(record(path)) for path, m in bns.items()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    was_training = model.training
    devices = sorted({b.device.index for b, _ in buffers if b.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), quiet():
            model.train()
            model(*args, **kwargs)
    except Exception:  # the trace ran it; a failure here only loses the eps correction
        out.clear()
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        model.train(was_training)
    return {path: v for path, v in out.items() if path not in reused}


_GLUE_MAX_ELEMENTS = 1 << 16  # larger computed constants are left to the analysis


def fold_glue(model: ir.Model, module_names: set[str]) -> int:
    """Store the value of each small constant computed without reading the elements of a
    module tensor (``module_names``) as its ``const_value``; return how many.

    Which values are constant, and their values, come from the analysis' own index of the
    graph (:func:`~graphteleport.analysis.index_graph`); ``Shape``/``Size`` read only
    their input's shape and ``CastLike`` only its second input's type, so those inputs do
    not make a value depend on a module tensor.  The nodes stay in the graph (the model
    runs as before); ``onnx_ir`` only writes ``const_value`` for initializers, so
    serialisation is unchanged.
    """
    index = index_graph(model)
    from_module = {id(v) for v in model.graph.initializers.values() if v.name in module_names}
    folded = 0
    for node in model.graph:
        if any(id(v) in from_module for v in _element_inputs(node)):
            from_module.update(id(o) for o in node.outputs)
            continue
        if not index.is_constant(node) or node.op_type == "Constant":
            continue
        for v in node.outputs:
            try:
                arr = index.constant_value(v)
            except Exception:  # left to the analysis, which pins what it cannot read
                break
            if arr.size <= _GLUE_MAX_ELEMENTS:
                v.const_value = ir.tensor(arr, name=v.name)
                folded += 1
    return folded


def _element_inputs(node: ir.Node) -> list[ir.Value]:
    """The inputs whose elements (not only shape or type) a node reads."""
    if node.op_type in ("Shape", "Size"):
        return []
    inputs = node.inputs[:1] if node.op_type == "CastLike" else node.inputs
    return [v for v in inputs if v is not None]


def drop_zero_biases(model: ir.Model) -> int:
    """Give bias-free convolutions no bias input (the exporter passes a computed zero one) and
    remove the glue that built it; return how many.  The function is the same; the analysis
    then has no constant to check per convolution."""
    dropped = 0
    for node in model.graph:
        if node.op_type not in ("Conv", "ConvTranspose") or len(node.inputs) < 3:
            continue
        bias = node.inputs[2]
        if bias is None or bias.is_initializer() or bias.const_value is None:
            continue
        if not np.any(bias.const_value.numpy()):
            node.replace_input_with(2, None)
            dropped += 1
    if dropped:
        RemoveUnusedNodesPass()(model)
    return dropped
