"""The FX frontend (``graphteleport.frontends.fx``): ``symbolic_trace`` translated op by op.

* every entry of the translation tables (``fx_ops.MODULES``, ``FUNCTIONS``, ``METHODS``)
  is exercised by a tiny module below (``test_every_translation_is_exercised`` checks which
  entries the traced graphs dispatch to); each one's translated onnx_ir model, serialised and
  run in onnxruntime, computes what torch computes, to 1e-6 of the output's scale;
* what the FX path does not translate falls back to the exporter (``tracer="auto"``) or is an
  ``InputError`` (``tracer="fx"``): data-dependent numbers, in-place ops read again later,
  forward hooks, untraceable control flow, ops outside the tables;
* on every registry architecture the FX path's analysis finds the same free cofactors as the
  exporter path's, in both modes, and the same BatchNorm input variances.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")
from conftest import run_ort  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from graphteleport.errors import InputError  # noqa: E402
from graphteleport.frontends import fx as gt_fx  # noqa: E402
from graphteleport.frontends import fx_ops  # noqa: E402
from graphteleport.frontends.torch import TorchGraph, batchnorm_input_variance, trace  # noqa: E402
from graphteleport.torch import analyze  # noqa: E402
from models.architectures import ARCHITECTURES, randomize_  # noqa: E402

pytestmark = pytest.mark.torch

TOL = 1e-6  # of the output's largest magnitude


class Fn(nn.Module):
    """``fn(self, x)``: a function of one tensor, with tensors for it as parameters."""

    def __init__(self, fn: Callable[..., Any], **params: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        for name, t in params.items():
            self.register_parameter(name, nn.Parameter(t))

    def forward(self, x: torch.Tensor) -> Any:
        return self.fn(self, x)


class Fn2(Fn):
    """``fn(self, x, y)``: a function of two tensors."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:  # type: ignore[override]
        return self.fn(self, x, y)


class Stats(nn.Module):
    """``F.batch_norm`` with running statistics as buffers."""

    def __init__(self, c: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.w, self.b = (
            nn.Parameter(torch.rand(c, generator=gen) + 0.5),
            nn.Parameter(torch.randn(c, generator=gen)),
        )
        self.register_buffer("rm", torch.randn(c, generator=gen))
        self.register_buffer("rv", torch.rand(c, generator=gen) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.rm, self.rv, self.w, self.b, training=False, eps=1e-3)


def rnd(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@dataclass
class Case:
    """A tiny module and its inputs; ``id`` names it in the test report."""

    id: str
    build: Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]


def module(m: nn.Module, *shape: int, scale: float = 1.0) -> Callable[[], Any]:
    """``m`` as a leaf inside a Sequential (FX calls it, not its forward), randomised."""

    def build() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        torch.manual_seed(0)
        return randomize_(nn.Sequential(m), 0), (scale * rnd(*shape),)

    return build


def fn(f: Callable[..., Any], *shape: int, **params: torch.Tensor) -> Callable[[], Any]:
    return lambda: (Fn(f, **params), (rnd(*shape),))


def fn2(f: Callable[..., Any], a: tuple[int, ...], b: tuple[int, ...]) -> Callable[[], Any]:
    return lambda: (Fn2(f), (rnd(*a), rnd(*b, seed=1)))


def ids(*shape: int) -> torch.Tensor:
    return torch.randint(0, 10, shape, generator=torch.Generator().manual_seed(0))


def aug_add(s: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z = x * 2
    z += y  # FX records x + y: right here, the sum is all that is read
    return z


W = {"w": rnd(4, 5, seed=2), "b": rnd(4, seed=3)}  # a Linear's weight and bias
X4 = (2, 3, 6, 6)

CASES = [
    # modules
    Case("Linear", module(nn.Linear(5, 4), 2, 5)),
    Case("Linear-3d", module(nn.Linear(5, 4, bias=False), 2, 3, 5)),
    Case("Conv1d", module(nn.Conv1d(3, 4, 3, padding=1), 2, 3, 8)),
    Case("Conv2d-same", module(nn.Conv2d(3, 4, (3, 2), padding="same", dilation=2), *X4)),
    Case("Conv2d-groups", module(nn.Conv2d(4, 4, 3, 2, 1, groups=2, bias=False), 2, 4, 7, 7)),
    Case("Conv3d", module(nn.Conv3d(2, 3, 3, padding=1), 1, 2, 5, 5, 5)),
    Case("ConvTranspose1d", module(nn.ConvTranspose1d(3, 2, 3, 2, 1, 1), 2, 3, 6)),
    Case("ConvTranspose2d", module(nn.ConvTranspose2d(4, 2, 2, stride=2, groups=2), 2, 4, 4, 4)),
    Case("ConvTranspose3d", module(nn.ConvTranspose3d(2, 2, 2, 2, bias=False), 1, 2, 3, 3, 3)),
    Case("BatchNorm1d", module(nn.BatchNorm1d(5), 4, 5)),
    Case("BatchNorm1d-3d", module(nn.BatchNorm1d(5), 4, 5, 6)),
    Case("BatchNorm2d", module(nn.BatchNorm2d(3), *X4)),
    Case("BatchNorm3d", module(nn.BatchNorm3d(2), 2, 2, 3, 3, 3)),
    Case("LayerNorm", module(nn.LayerNorm(5), 2, 3, 5)),
    Case("LayerNorm-2d", module(nn.LayerNorm((3, 5), bias=False), 2, 3, 5)),
    Case("Embedding", lambda: (nn.Sequential(nn.Embedding(10, 4)), (ids(2, 3),))),
    Case("ReLU", module(nn.ReLU(), *X4)),
    Case("LeakyReLU", module(nn.LeakyReLU(0.2), *X4)),
    Case("Hardtanh", module(nn.Hardtanh(-0.5, 0.3), *X4)),
    Case("ReLU6", module(nn.ReLU6(), *X4, scale=5.0)),
    Case("ELU", module(nn.ELU(0.7), *X4)),
    Case("GELU", module(nn.GELU(), *X4)),
    Case("GELU-tanh", module(nn.GELU("tanh"), *X4)),
    Case("Sigmoid", module(nn.Sigmoid(), *X4)),
    Case("Tanh", module(nn.Tanh(), *X4)),
    Case("SiLU", module(nn.SiLU(), *X4)),
    Case("Softmax", module(nn.Softmax(dim=1), *X4)),
    Case("LogSoftmax", module(nn.LogSoftmax(-1), *X4)),
    Case("Identity", module(nn.Identity(), *X4)),
    Case("Dropout", module(nn.Dropout(0.3), *X4)),
    Case("Dropout1d", module(nn.Dropout1d(0.3), 2, 3, 4)),
    Case("Dropout2d", module(nn.Dropout2d(0.3), *X4)),
    Case("Dropout3d", module(nn.Dropout3d(0.3), 1, 2, 3, 3, 3)),
    Case("MaxPool1d", module(nn.MaxPool1d(2), 2, 3, 8)),
    Case("MaxPool2d", module(nn.MaxPool2d(3, stride=2, padding=1), 2, 3, 9, 9)),
    Case("MaxPool2d-ceil", module(nn.MaxPool2d(2, ceil_mode=True), 2, 3, 8, 8)),
    Case("MaxPool3d", module(nn.MaxPool3d(2), 1, 2, 4, 4, 4)),
    Case("AvgPool1d", module(nn.AvgPool1d(3, stride=2, padding=1), 2, 3, 9)),
    Case("AvgPool2d", module(nn.AvgPool2d(2, padding=1, count_include_pad=False), 2, 3, 7, 7)),
    Case("AvgPool3d", module(nn.AvgPool3d(2), 1, 2, 4, 4, 4)),
    Case("AdaptiveAvgPool1d", module(nn.AdaptiveAvgPool1d(1), 2, 3, 8)),
    Case("AdaptiveAvgPool2d", module(nn.AdaptiveAvgPool2d((1, 1)), 2, 3, 5, 5)),
    Case("AdaptiveAvgPool2d-same", module(nn.AdaptiveAvgPool2d(5), 2, 3, 5, 5)),
    Case("AdaptiveAvgPool3d", module(nn.AdaptiveAvgPool3d(1), 1, 2, 3, 3, 3)),
    Case("AdaptiveMaxPool1d", module(nn.AdaptiveMaxPool1d(1), 2, 3, 8)),
    Case("AdaptiveMaxPool2d", module(nn.AdaptiveMaxPool2d(1), 2, 3, 5, 5)),
    Case("AdaptiveMaxPool3d", module(nn.AdaptiveMaxPool3d(1), 1, 2, 3, 3, 3)),
    Case("Flatten", module(nn.Flatten(), *X4)),
    Case("Unflatten", module(nn.Unflatten(1, (3, 4)), 2, 12)),
    # functions
    Case("torch.relu", fn(lambda s, x: torch.relu(x), *X4)),
    Case("F.relu-inplace", fn(lambda s, x: F.relu(x * 2, inplace=True), *X4)),
    Case("F.leaky_relu", fn(lambda s, x: F.leaky_relu(x, 0.2), *X4)),
    Case("F.leaky_relu-int", fn(lambda s, x: F.leaky_relu(x, 0), *X4)),
    Case("F.elu", fn(lambda s, x: F.elu(x, alpha=0.5), *X4)),
    Case("F.gelu", fn(lambda s, x: F.gelu(x, approximate="tanh"), *X4)),
    Case("torch.sigmoid", fn(lambda s, x: torch.sigmoid(x), *X4)),
    Case("torch.tanh", fn(lambda s, x: torch.tanh(x), *X4)),
    Case("F.hardtanh", fn(lambda s, x: F.hardtanh(x, -0.3, 0.6), *X4)),
    Case("F.relu6", fn(lambda s, x: F.relu6(5 * x), *X4)),
    Case("torch.clamp", fn(lambda s, x: torch.clamp(x, -0.5, 0.4), *X4)),
    Case("torch.clip", fn(lambda s, x: torch.clip(x, min=-0.1), *X4)),
    Case("F.silu", fn(lambda s, x: F.silu(x), *X4)),
    Case("F.softmax", fn(lambda s, x: F.softmax(x, dim=-1), *X4)),
    Case("torch.softmax", fn(lambda s, x: torch.softmax(x, 1), *X4)),
    Case("F.log_softmax", fn(lambda s, x: F.log_softmax(x, dim=1), *X4)),
    Case("torch.log_softmax", fn(lambda s, x: torch.log_softmax(x, -1), *X4)),
    Case("F.dropout", fn(lambda s, x: F.dropout(x, 0.3, training=False), *X4)),
    Case("F.dropout1d", fn(lambda s, x: F.dropout1d(x, 0.3, False), 2, 3, 4)),
    Case("F.dropout2d", fn(lambda s, x: F.dropout2d(x, training=False), *X4)),
    Case("F.dropout3d", fn(lambda s, x: F.dropout3d(x, training=False), 1, 2, 3, 3, 3)),
    Case("F.linear", fn(lambda s, x: F.linear(x, s.w, s.b), 2, 5, **W)),
    Case("F.linear-3d", fn(lambda s, x: F.linear(x, s.w), 2, 3, 5, **W)),
    Case("F.conv1d", fn(lambda s, x: F.conv1d(x, s.w, padding=1), 2, 3, 6, w=rnd(4, 3, 3))),
    Case(
        "F.conv2d",
        fn(lambda s, x: F.conv2d(x, s.w, s.b, 2, groups=3), *X4, w=rnd(3, 1, 3, 3), b=rnd(3)),
    ),
    Case(
        "F.conv3d",
        fn(lambda s, x: F.conv3d(x, s.w, None, 1, 1), 1, 2, 4, 4, 4, w=rnd(3, 2, 3, 3, 3)),
    ),
    Case("F.batch_norm", lambda: (Stats(3), (rnd(*X4),))),
    Case(
        "F.layer_norm",
        fn(lambda s, x: F.layer_norm(x, (5,), s.w, s.b), 2, 3, 5, w=rnd(5), b=rnd(5)),
    ),
    Case("F.embedding", lambda: (Fn(lambda s, x: F.embedding(x, s.w), w=rnd(10, 4)), (ids(3),))),
    Case("F.max_pool1d", fn(lambda s, x: F.max_pool1d(x, 2), 2, 3, 8)),
    Case("F.max_pool2d", fn(lambda s, x: F.max_pool2d(x, 3, 1, 1), *X4)),
    Case("F.max_pool3d", fn(lambda s, x: F.max_pool3d(x, 2), 1, 2, 4, 4, 4)),
    Case("F.avg_pool1d", fn(lambda s, x: F.avg_pool1d(x, 2), 2, 3, 8)),
    Case("F.avg_pool2d", fn(lambda s, x: F.avg_pool2d(x, 3, 2, 1), *X4)),
    Case("F.avg_pool3d", fn(lambda s, x: F.avg_pool3d(x, 2), 1, 2, 4, 4, 4)),
    Case("F.adaptive_avg_pool1d", fn(lambda s, x: F.adaptive_avg_pool1d(x, 1), 2, 3, 8)),
    Case("F.adaptive_avg_pool2d", fn(lambda s, x: F.adaptive_avg_pool2d(x, 1), *X4)),
    Case("F.adaptive_avg_pool3d", fn(lambda s, x: F.adaptive_avg_pool3d(x, 1), 1, 2, 3, 3, 3)),
    Case("torch.flatten", fn(lambda s, x: torch.flatten(x, 1), *X4)),
    Case("torch.reshape", fn(lambda s, x: torch.reshape(x, (x.shape[0], -1)), *X4)),
    Case("torch.squeeze", fn(lambda s, x: torch.squeeze(x, 1), 2, 1, 4)),
    Case("torch.unsqueeze", fn(lambda s, x: torch.unsqueeze(x, -1), 2, 4)),
    Case("torch.permute", fn(lambda s, x: torch.permute(x, (0, 2, 1)), 2, 3, 4)),
    Case("torch.transpose", fn(lambda s, x: torch.transpose(x, 1, 2), 2, 3, 4)),
    Case("torch.t", fn(lambda s, x: torch.t(x), 3, 4)),
    Case("operator.add", fn2(lambda s, x, y: (x + y, x + 2.0, 3 + x), (2, 3, 4), (3, 4))),
    Case("torch.add", fn2(lambda s, x, y: torch.add(x, y), (2, 3), (2, 3))),
    Case("operator.sub", fn2(lambda s, x, y: (x - y, 1 - x), (2, 3), (2, 3))),
    Case("torch.sub", fn(lambda s, x: torch.sub(x, 1.5), 2, 3)),
    Case("operator.mul", fn2(lambda s, x, y: x * y * 0.5, (2, 3, 4), (4,))),
    Case("torch.mul", fn2(lambda s, x, y: torch.mul(x, y), (2, 3), (2, 3))),
    Case("operator.truediv", fn2(lambda s, x, y: (x / 4, x / (y.abs() + 1)), (2, 3), (2, 3))),
    Case("torch.div", fn2(lambda s, x, y: torch.div(x, y.abs() + 1), (2, 3), (2, 3))),
    Case("operator.add-augmented", fn2(aug_add, (2, 3), (2, 3))),
    Case("operator.neg", fn(lambda s, x: -x, 2, 3)),
    Case("torch.neg", fn(lambda s, x: torch.neg(x), 2, 3)),
    Case("operator.matmul", fn2(lambda s, x, y: x @ y, (2, 3, 4), (4, 5))),
    Case("torch.matmul", fn2(lambda s, x, y: torch.matmul(x, y), (2, 3, 4), (2, 4, 5))),
    Case("torch.mm", fn2(lambda s, x, y: torch.mm(x, y), (3, 4), (4, 5))),
    Case("torch.bmm", fn2(lambda s, x, y: torch.bmm(x, y), (2, 3, 4), (2, 4, 5))),
    Case("torch.cat", fn2(lambda s, x, y: torch.cat([x, y], 1), (2, 3), (2, 4))),
    Case("torch.concat", fn2(lambda s, x, y: torch.concat((x, y), dim=0), (2, 3), (1, 3))),
    Case(
        "torch.concatenate", fn2(lambda s, x, y: torch.concatenate([x, y], axis=-1), (2, 3), (2, 1))
    ),
    Case("torch.mean", fn(lambda s, x: (torch.mean(x, 1), torch.mean(x)), *X4)),
    Case("torch.sum", fn(lambda s, x: torch.sum(x, (1, 2), keepdim=True), *X4)),
    Case("torch.split", fn(lambda s, x: torch.split(x, 2, dim=1)[1] * 2, 2, 5)),
    Case("torch.chunk", fn(lambda s, x: torch.chunk(x, 3, -1), 2, 6)),
    # methods
    Case(".relu", fn(lambda s, x: x.relu(), *X4)),
    Case(".relu_", fn(lambda s, x: (x * 1).relu_(), *X4)),
    Case(".sigmoid", fn(lambda s, x: x.sigmoid(), *X4)),
    Case(".tanh", fn(lambda s, x: x.tanh(), *X4)),
    Case(".clamp", fn(lambda s, x: x.clamp(min=0.1), *X4)),
    Case(".clip", fn(lambda s, x: x.clip(-0.2, 0.2), *X4)),
    Case(".softmax", fn(lambda s, x: x.softmax(-1), *X4)),
    Case(".log_softmax", fn(lambda s, x: x.log_softmax(1), *X4)),
    Case(".view", fn(lambda s, x: x.view(x.size(0), x.size(1) * 36), *X4)),
    Case(".reshape", fn(lambda s, x: x.reshape(-1), *X4)),
    Case(".view_as", fn2(lambda s, x, y: x.view_as(y), (2, 6), (3, 4))),
    Case(".reshape_as", fn2(lambda s, x, y: x.reshape_as(y), (2, 6), (4, 3))),
    Case(".flatten", fn(lambda s, x: x.flatten(1), *X4)),
    Case(".unflatten", fn(lambda s, x: x.unflatten(1, (2, 3)), 2, 6)),
    Case(".squeeze", fn(lambda s, x: x.squeeze(), 2, 1, 4)),
    Case(".unsqueeze", fn(lambda s, x: x.unsqueeze(0), 2, 4)),
    Case(".expand", fn(lambda s, x: x.expand(2, 3, 4), 1, 3, 4)),
    Case(".expand_as", fn2(lambda s, x, y: x.expand_as(y) + y, (3, 1), (2, 3, 4))),
    Case(".permute", fn(lambda s, x: (x.permute(0, 2, 1), x.permute((2, 0, 1))), 2, 3, 4)),
    Case(".transpose", fn(lambda s, x: x.transpose(0, -1), 2, 3, 4)),
    Case(".t", fn(lambda s, x: x.t(), 3, 4)),
    Case(".contiguous", fn(lambda s, x: x.transpose(0, 1).contiguous(), 3, 4)),
    Case(".clone", fn(lambda s, x: x.clone(), 3, 4)),
    Case(".detach", fn(lambda s, x: x.detach(), 3, 4)),
    Case(".to", fn(lambda s, x: x.to(torch.float64), 3, 4)),
    Case(".float", fn(lambda s, x: x.float(), 3, 4)),
    Case(".double", fn(lambda s, x: x.double(), 3, 4)),
    Case(".half", fn(lambda s, x: x.half(), 3, 4)),
    Case(".type_as", fn2(lambda s, x, y: x.type_as(y.double()), (3, 4), (3, 4))),
    Case(".add", fn2(lambda s, x, y: x.add(y), (2, 3), (3,))),
    Case(".sub", fn2(lambda s, x, y: x.sub(y), (2, 3), (2, 3))),
    Case(".mul", fn(lambda s, x: x.mul(3), 2, 3)),
    Case(".div", fn2(lambda s, x, y: x.div(y.abs() + 1), (2, 3), (2, 3))),
    Case(".add_", fn2(lambda s, x, y: (x * 1).add_(y), (2, 3), (2, 3))),
    Case(".sub_", fn2(lambda s, x, y: (x * 1).sub_(y), (2, 3), (2, 3))),
    Case(".mul_", fn2(lambda s, x, y: (x * 1).mul_(y), (2, 3), (2, 3))),
    Case(".div_", fn(lambda s, x: (x * 1).div_(7), 2, 3)),
    Case(".neg", fn(lambda s, x: x.neg(), 2, 3)),
    Case(".abs", fn(lambda s, x: x.abs(), 2, 3)),
    Case("torch.abs", fn(lambda s, x: torch.abs(x), 2, 3)),
    Case(".matmul", fn2(lambda s, x, y: x.matmul(y), (2, 3), (3, 2))),
    Case(".mm", fn2(lambda s, x, y: x.mm(y), (2, 3), (3, 2))),
    Case(".bmm", fn2(lambda s, x, y: x.bmm(y), (2, 2, 3), (2, 3, 2))),
    Case(".mean", fn(lambda s, x: x.mean(dim=(2, 3), keepdim=True), *X4)),
    Case(".sum", fn(lambda s, x: (x.sum(-1), x.sum()), *X4)),
    Case(".split", fn(lambda s, x: x.split([1, 2], dim=1), 2, 3)),
    Case(".chunk", fn(lambda s, x: x.chunk(2, 0)[0], 4, 3)),
]


def flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in flat(item)]


def translated(case: Case) -> tuple[TorchGraph, nn.Module, tuple[torch.Tensor, ...]]:
    model, inputs = case.build()
    return gt_fx.trace_fx(model, inputs), model, inputs


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_translation_runs_as_torch_computes(case: Case) -> None:
    graph, model, inputs = translated(case)
    assert graph.tracer == "fx"
    feeds = {v.name: x.numpy() for v, x in zip(graph.model.graph.inputs, inputs)}
    got = run_ort(ir.from_proto(ir.to_proto(graph.model)), feeds)
    with torch.no_grad():
        ref = [t.numpy() for t in flat(model.eval()(*inputs))]
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        assert a.shape == b.shape and a.dtype == b.dtype
        scale = max(float(np.abs(a.astype(np.float64)).max()), 1e-30)
        err = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) / scale
        assert err <= TOL, f"{case.id}: {err:.1e}"


def dispatched(graph: TorchGraph) -> set[Any]:
    """The table entries a traced graph's FX nodes were translated by."""
    gm = graph.fx_module
    keys: set[Any] = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mro = type(gm.get_submodule(node.target)).__mro__
            keys.update([c for c in mro if c in fx_ops.MODULES][:1])
        elif node.target in (fx_ops.FUNCTIONS if node.op == "call_function" else fx_ops.METHODS):
            keys.add(node.target)
    return keys


def test_every_translation_is_exercised() -> None:
    """Each entry of the three tables translates some node of the cases above (an entry no
    traced graph dispatches to would be untested, or dead)."""
    keys: set[Any] = set()
    for case in CASES:
        keys |= dispatched(translated(case)[0])
    table = {*fx_ops.MODULES, *fx_ops.FUNCTIONS, *fx_ops.METHODS}
    missing = sorted(map(str, table - keys))
    assert missing == []


def test_graph_form_follows_the_exporter() -> None:
    """Initializers are the module's tensors under their state_dict names (no copy; a tied
    weight once), values are named after FX nodes, and nodes carry their module path."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight
            self.act = nn.ReLU()

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.act(self.emb(ids)))

    model = Tied()
    graph = gt_fx.trace_fx(model, ids(2, 3))
    inits = graph.model.graph.initializers
    assert list(inits) == ["emb.weight"]
    stored = inits["emb.weight"].const_value
    assert stored is not None and stored.raw is model.emb.weight  # type: ignore[attr-defined]
    relu = next(n for n in graph.model.graph if n.op_type == "Relu")
    assert relu.outputs[0].name == "act"
    assert relu.metadata_props[gt_fx.SCOPES] == "['', 'act', 'act']"
    assert relu.metadata_props[gt_fx.FX_NODE] == "act"
    exported = trace(model, ids(2, 3), "export")
    assert analyze(graph).solution.free.sum() == analyze(exported).solution.free.sum()


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.sum().item()


class ReadAfterInPlace(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        z = y.relu_()
        return z + y  # reads the mutated y


class Aliased(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x * 2
        b = a
        b += 1  # eager: a changes too; FX's graph: a + 1 is a new value
        return a * 3


class FunctionalDropout(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(torch.relu(x), 0.5, self.training)  # FX fixes self.training


class Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) if x.shape[0] > 1 else torch.tanh(x)


class Unknown(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erf(x)


def hooked() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    model[1].register_forward_hook(lambda m, a, out: out * 2)
    return model


@pytest.mark.parametrize(
    ("model", "why"),
    [
        (DataDependent(), "no translation for call_method item"),
        (ReadAfterInPlace(), "in-place op on a value read again later"),
        (Aliased(), "computes other values than the module"),
        (FunctionalDropout(), "computes other values than the module"),
        (Branchy(), "torch.fx cannot trace it"),
        (Unknown(), "no translation for call_function erf"),
        (hooked(), "forward hooks"),
    ],
    ids=["item", "inplace", "alias", "training", "control-flow", "unknown-op", "hooks"],
)
def test_untranslatable_falls_back_to_the_exporter(model: nn.Module, why: str) -> None:
    """What FX cannot express exactly is refused with the reason (``tracer="fx"``) and traced
    by the exporter instead (``"auto"``), whose graph computes the module's function."""
    x = rnd(2, 3)
    with pytest.raises(InputError, match=why):
        trace(model, x, tracer="fx")
    graph = trace(model, x)
    assert graph.tracer == "export" and graph.fx_module is None
    with torch.no_grad():
        ref = model.eval()(x).numpy()  # the exporter's graph is the eval-mode function
    got = run_ort(graph.model, {graph.model.graph.inputs[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_unknown_tracer_is_refused() -> None:
    with pytest.raises(InputError, match="unknown tracer"):
        trace(nn.ReLU(), rnd(2), tracer="jit")


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_registry_model_same_analysis_as_exporter(name: str) -> None:
    """On every registry architecture: the FX path is taken, and its analysis finds the same
    free cofactors as the exporter path's in both modes, with the same BatchNorm input
    variances (one recorded forward against ``batchnorm_input_variance``'s hooks)."""
    model, shape = ARCHITECTURES[name]()
    x = torch.randn((4, *shape[1:]), generator=torch.Generator().manual_seed(1))
    fx_graph, exported = trace(model, x), trace(model, x, tracer="export")
    assert fx_graph.tracer == "fx" and exported.tracer == "export"
    for mode in ("absorb", "insert"):
        fx_free = analyze(fx_graph, mode).solution.free.sum()
        assert fx_free == analyze(exported, mode).solution.free.sum(), mode
    measured = batchnorm_input_variance(model, (x,), {})
    assert fx_graph.bn_var.keys() == measured.keys()
    for path, var in measured.items():
        np.testing.assert_allclose(fx_graph.bn_var[path], var, rtol=1e-10)


class Pair(nn.Module):
    def forward(self, xs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.relu(xs[0]) + xs[1]


def test_tensors_in_a_container_are_not_baked_in() -> None:
    """An input that holds tensors in a tuple would be traced as a constant: refused (the
    exporter takes it)."""
    pair = (rnd(2, 3), rnd(2, 3, seed=1))
    with pytest.raises(InputError, match="holds tensors in a container"):
        trace(Pair(), (pair,), tracer="fx")
    assert trace(Pair(), (pair,)).tracer == "export"
