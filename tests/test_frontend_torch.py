"""The torch frontend's work on a trace (``graphteleport.frontends.torch``), done once per trace:
on the exporter's path, constant glue evaluated and stored and computed zero conv biases
dropped; on both paths, the graph's facts indexed (``analysis.index_graph``; each analysis
copies the index) and BatchNorm input variances measured without touching the module.  Each
test states what an analysis relies on; the function-preservation tests of ``test_torch.py``
check the whole."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from graphteleport.analysis import analyze_model  # noqa: E402
from graphteleport.frontends.torch import batchnorm_input_variance, trace  # noqa: E402
from graphteleport.torch import analyze  # noqa: E402

pytestmark = pytest.mark.torch


def conv_bn(bias: bool = False) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=bias), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
        nn.Conv2d(4, 2, 1),
    )  # fmt: skip
    return model, torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def test_zero_conv_bias_is_dropped_and_real_bias_kept() -> None:
    """The exporter gives a bias-free conv a computed zero bias (Shape/Expand/CastLike); the
    trace drops it and the glue that built it.  A real bias stays, as the parameter."""
    model, x = conv_bn(bias=False)
    graph = trace(model, x, tracer="export")
    convs = [n for n in graph.model.graph if n.op_type == "Conv"]
    assert len(convs) == 2
    assert len(convs[0].inputs) == 2 or convs[0].inputs[2] is None
    assert convs[1].inputs[2] is not None and convs[1].inputs[2].name == "4.bias"
    assert not any(n.op_type in ("Expand", "CastLike") for n in graph.model.graph)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_graph_facts_are_reused_and_writable_respected(tracer: str) -> None:
    """An indexed graph (``index_graph``) keeps shapes and provenance but applies each call's
    ``writable``: a tensor the caller may not rewrite is not absorbed (its neurons are pinned
    instead)."""
    model, x = conv_bn()
    graph = trace(model, x, tracer=tracer)
    assert graph.index is not None
    full = analyze(graph)
    assert any(ab.source.name == "0.weight" for ab in full.absorbs)
    frozen = analyze_model(
        graph.model,
        graph.input_shapes,
        writable=lambda name: name != "0.weight",
        training=True,
        index=graph.index,
    )
    assert not any(ab.source.name == "0.weight" for ab in frozen.absorbs)
    assert frozen.solution.free.sum() < full.solution.free.sum()
    again = analyze(graph)  # the shared facts were not narrowed by the call before
    assert again.solution.free.sum() == full.solution.free.sum()


def test_batchnorm_variance_is_measured_without_side_effects() -> None:
    """One train-mode forward of the example inputs gives each BatchNorm's input variance
    (biased, per channel, as BatchNorm normalises); the module's buffers, mode and the
    global RNG are as before (dropout draws from a forked generator)."""
    model, x = conv_bn()
    model.eval()
    buffers = copy.deepcopy(dict(model.named_buffers()))
    rng = torch.random.get_rng_state()
    var = batchnorm_input_variance(model, (x,), {})
    assert set(var) == {"1"}
    with torch.no_grad():
        conv_out = model[0](x)
    expected = conv_out.double().var(dim=(0, 2, 3), unbiased=False).numpy()
    np.testing.assert_allclose(var["1"], expected, rtol=1e-6)
    assert not model.training
    assert torch.equal(torch.random.get_rng_state(), rng)
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name


def test_module_called_twice_has_no_measured_variance() -> None:
    """A BatchNorm module called twice has no single input variance: none is recorded (its
    layers then get the eval-exact correction only)."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(self.bn(x)))

    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert batchnorm_input_variance(Twice(), (x,), {}) == {}
