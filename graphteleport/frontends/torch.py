"""Torch frontend: an ``nn.Module`` to the same graph form as an ONNX file.

The module is traced by ``torch.export`` and translated by torch's own ONNX
exporter (``torch.onnx.export(dynamo=True, optimize=False)``) into an in-memory
onnx_ir model, so the analysis is the one ONNX files get: one rule table, two
frontends.  Without optimisation the exporter keeps every parameter and buffer as
an initializer named by its ``state_dict`` key (weights a Linear transposes at
run time stay behind a ``Transpose`` node, which the analysis traces back), and
every value is named after the FX node that computes it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir
import torch
from torch import nn

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
    return TorchGraph(program.model, program, module_tensors(model), args, kwargs)
