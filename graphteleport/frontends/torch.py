"""Torch frontend: an ``nn.Module`` to the same graph form as an ONNX file.

The module is traced by ``torch.export`` and translated by torch's own ONNX
exporter (``torch.onnx.export(dynamo=True, optimize=False)``) into an in-memory
onnx_ir model, so the analysis is the one ONNX files get: one rule table, two
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
(:class:`~graphteleport.analysis.graphinfo.GraphInfo`); each analysis starts from a
:meth:`~graphteleport.analysis.graphinfo.GraphInfo.fresh` copy with empty value caches.
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

from graphteleport.analysis.graphinfo import GraphInfo, default_opset, evaluate
from graphteleport.errors import InputError

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

    info: GraphInfo | None = None  # shapes, types and constants, indexed at trace time
    # per BatchNorm module path: the per-channel variance of its input in a train-mode
    # forward of the example inputs (``batchnorm_input_variance``)
    bn_var: dict[str, np.ndarray] = field(default_factory=dict)

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


def trace(model: nn.Module, example_inputs: Any) -> TorchGraph:
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
    graph.info = GraphInfo(graph.model, graph.input_shapes)  # reused for its structure only
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

    The nodes stay in the graph (the model runs as before); ``onnx_ir`` only writes
    ``const_value`` for initializers, so serialisation is unchanged.
    """
    opset = default_opset(model)
    folded = 0
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type == "Constant":
            continue
        outs = _glue(node, module_names, opset)
        for v, arr in zip(node.outputs, outs or ()):
            arr = np.asarray(arr)
            if arr.size <= _GLUE_MAX_ELEMENTS:
                v.const_value = ir.tensor(arr, name=v.name)
                folded += 1
    return folded


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


def _glue(node: ir.Node, module_names: set[str], opset: int) -> list[np.ndarray] | None:
    """The node's outputs when it computes from constants alone, else None.

    ``Shape``/``Size`` read only their input's static shape, ``CastLike`` only its
    second input's type.
    """
    if node.op_type in ("Shape", "Size"):
        dims = _static_shape(node.inputs[0])
        if dims is None:
            return None
        if node.op_type == "Size":
            return [np.array(int(np.prod(dims)), dtype=np.int64)]
        lo, hi = _attr_int(node, "start", 0), _attr_int(node, "end", len(dims))
        return [np.array(dims, dtype=np.int64)[lo:hi]]
    inputs: list[np.ndarray | None] = []
    for k, v in enumerate(node.inputs):
        if v is None:
            inputs.append(None)
        elif node.op_type == "CastLike" and k == 1:
            if v.dtype is None:
                return None
            inputs.append(np.zeros(0, dtype=v.dtype.numpy()))
        elif v.name in module_names or (tensor := ir.convenience.get_const_tensor(v)) is None:
            return None
        else:
            inputs.append(np.asarray(tensor.numpy()))
    try:
        return evaluate(node, inputs, opset)
    except Exception:  # left to the analysis, which pins what it cannot read
        return None


def _static_shape(v: ir.Value | None) -> tuple[int, ...] | None:
    if v is None or v.shape is None or not all(isinstance(d, int) for d in v.shape):
        return None
    return tuple(int(d) for d in v.shape)  # type: ignore[arg-type]


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default
