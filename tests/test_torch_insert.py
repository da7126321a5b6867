"""Insert mode on any traceable module (:mod:`graphteleport.torch.insert`, ``.graphmodule``).

Where hooks on activation modules cannot carry insert mode's Muls, the teleport returns a
``torch.fx.GraphModule`` with them (``result.model``).  Checked with inter-landscape cofactors
(``cob_range=0.9``: negative ones, so every ReLU-family activation needs its Muls):

* functional activations (``F.relu``, ``torch.tanh``, ``x.sigmoid()``, ``F.silu`` — lowered to
  ``x · σ(x)`` for its one Mul — and a LayerNorm whose input must be unscaled);
* a residual block that calls one ``nn.ReLU`` twice (torchvision's ``BasicBlock``: in-place
  ReLU, ``out += identity``): hooks per call where they suffice, and per FX call in a
  GraphModule where something else needs one;
* Hugging Face GPT-2, which FX cannot trace: the exporter's program, its LayerNorm inputs and
  attention split scaled in ``exported_program.module()``;

each preserved to 1e-5 (relative), in eval and train mode where the module has BatchNorm or
dropout (``test_torch.assert_preserved``; GPT-2's exported graph is eval-only), and its
``state_dict`` round trip exact: a GraphModule built the same way from another module with
other cofactors, loading it, computes the same outputs bit for bit.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest

torch = pytest.importorskip("torch")
from test_torch import RTOL, assert_preserved, flat_outputs, forward, hf_model, rel_err  # noqa: E402
from test_torch import Functional as ReLUs  # noqa: E402
from torch import fx, nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from graphteleport.torch import Teleporter, teleport  # noqa: E402
from models.architectures import randomize_  # noqa: E402

pytestmark = pytest.mark.torch

INTER = {"mode": "insert", "sampling": "inter_landscape", "cob_range": 0.9}


class Functional(nn.Module):
    """Activations called functionally, a dropout and a LayerNorm (its input unscaled)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, width), nn.Linear(width, width)
        self.fc3, self.head = nn.Linear(width, width), nn.Linear(width, 3)
        self.norm, self.drop = nn.LayerNorm(width), nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        h = torch.tanh(self.fc2(h))
        h = self.fc3(h).sigmoid()
        return self.head(F.silu(self.norm(self.drop(h))))


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one ``nn.ReLU(inplace=True)`` called twice, ``out += x``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class ResNet(nn.Module):
    """Two BasicBlocks; ``functional_head`` ends in ``torch.tanh`` (no module to hook)."""

    def __init__(self, functional_head: bool, c: int = 8) -> None:
        super().__init__()
        self.stem, self.act = nn.Conv2d(3, c, 3, padding=1), nn.ReLU()
        self.block1, self.block2 = BasicBlock(c), BasicBlock(c)
        self.fc, self.head = nn.Linear(c, 16), nn.Linear(16, 4)
        self.functional_head = functional_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block2(self.block1(self.act(self.stem(x))))
        h = self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))
        return self.head(torch.tanh(h) if self.functional_head else h)


def seeded(make: Any, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return randomize_(make(), seed)


def example(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def reload(source: nn.Module, target: nn.Module) -> None:
    """``target.load_state_dict`` of ``source``'s, through ``torch.save``."""
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer, weights_only=True))


def assert_round_trip(result: Any, fresh: nn.Module, x: Any, trains: tuple[bool, ...]) -> None:
    """``fresh`` (same architecture, other weights) teleported with other cofactors has the
    same cofactor buffers; loading ``result.model``'s state dict makes it compute the same
    outputs bit for bit (in each mode of ``trains``)."""
    other = teleport(fresh, x, seed=1, **INTER)
    assert isinstance(other.model, type(result.model).__mro__[1])
    assert other.inserted == result.inserted and other.hooked == result.hooked
    assert not torch.equal(forward(other.model, x, False)[0], forward(result.model, x, False)[0])
    reload(result.model, other.model)
    for train in trains:
        for a, b in zip(forward(result.model, x, train), forward(other.model, x, train)):
            assert torch.equal(a, b), f"{'train' if train else 'eval'} mode"


def wrapped_inputs(gm: fx.GraphModule, target: str) -> list[str]:
    """For each call of module ``target`` in ``gm``: the cofactor buffer its input is
    multiplied by ('' where none)."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == target:
            x = node.args[0]
            scaled = isinstance(x, fx.Node) and x.op == "call_function" and len(x.args) == 2
            buffer = x.args[1] if scaled else None
            out.append(str(buffer.target) if isinstance(buffer, fx.Node) else "")
    return out


def test_functional_activations() -> None:
    """Every functional activation is wrapped in the GraphModule (SiLU lowered to one Mul
    before its σ); the LayerNorm reads its input unscaled; outputs agree in eval and train
    mode (dropout), and the state dict round-trips."""
    model, x = seeded(Functional, 0), example(8, 6)
    result = assert_preserved(model, x, RTOL, seed=0, **INTER)
    assert result.tracer == "fx" and result.hooked == []
    assert isinstance(result.model, fx.GraphModule)
    assert (result.tau < 0).any()
    code = result.model.code
    for call in ("relu(mul", "tanh(mul", ".sigmoid()", "sigmoid(mul", "self.norm(mul"):
        assert call in code, call
    assert len(result.inserted) == 8  # 3 wraps x 2, the LayerNorm's input, SiLU's σ input
    assert_round_trip(result, seeded(Functional, 1), x, (False, True))


def test_residual_block_reusing_one_relu_hooks() -> None:
    """Where hooks suffice (every activation is a module), each block's one ReLU gets a pair
    of buffers per call, applied in call order; the module's own state dict round-trips."""
    model, x = seeded(lambda: ResNet(False), 0), example(4, 3, 8, 8)
    result = assert_preserved(model, x, RTOL, 1e-4, seed=0, **INTER)
    assert result.model is model and result.inserted == []
    assert {"block1.relu", "block2.relu"} <= set(result.hooked)
    names = {n for n, _ in model.block1.relu.named_buffers()}
    assert names == {"graphteleport_in", "graphteleport_out", "graphteleport_in_1",
                     "graphteleport_out_1"}  # fmt: skip
    assert_round_trip(result, seeded(lambda: ResNet(False), 1), x, (False, True))


def test_residual_block_reusing_one_relu_in_a_graph_module() -> None:
    """With a functional ``tanh`` in the head, the whole teleport goes to a GraphModule, where
    each of the two calls of a block's ReLU is wrapped on its own (by data flow, not call
    order); train and eval mode agree (BatchNorm), and the state dict round-trips."""
    model, x = seeded(lambda: ResNet(True), 0), example(4, 3, 8, 8)
    result = assert_preserved(model, x, RTOL, 1e-4, seed=0, **INTER)
    assert isinstance(result.model, fx.GraphModule) and result.hooked == []
    for block in ("block1", "block2"):
        buffers = wrapped_inputs(result.model, f"{block}.relu")
        assert len(buffers) == 2 and len(set(buffers)) == 2 and "" not in buffers, buffers
    assert_round_trip(result, seeded(lambda: ResNet(True), 1), x, (False, True))


def infer(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Outputs without changing the mode (the exported GraphModule refuses ``train``/``eval``)."""
    with torch.no_grad():
        return flat_outputs(model(**inputs))


def test_gpt2_in_the_exported_graph_module() -> None:
    """GPT-2 does not trace with FX: the exporter's program gets the Muls (LayerNorm inputs,
    the attention's split), in ``exported_program.module()``, which shares GPT-2's own
    parameters (the LM head still tied to the embedding).  Outputs agree to 1e-5; a second
    GPT-2 (other weights, other cofactors) loading the state dict computes the same logits."""
    model, inputs = hf_model("gpt2")
    reference = copy.deepcopy(model)
    result = teleport(model, inputs, seed=0, **INTER)
    assert result.tracer == "export" and isinstance(result.model, fx.GraphModule)
    assert (result.tau < 0).any() and result.inserted
    assert rel_err(infer(reference, inputs), infer(result.model, inputs)) <= RTOL
    shared = dict(result.model.named_parameters(remove_duplicate=False))
    for name, p in model.named_parameters(remove_duplicate=False):
        assert shared[name] is p, name
    assert model.lm_head.weight is model.transformer.wte.weight
    fresh, _ = hf_model("gpt2")
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(1.5)
    other = teleport(fresh, inputs, seed=1, **INTER)
    assert other.inserted == result.inserted
    assert not torch.equal(infer(other.model, inputs)[0], infer(result.model, inputs)[0])
    reload(result.model, other.model)
    for a, b in zip(infer(result.model, inputs), infer(other.model, inputs)):
        assert torch.equal(a, b)


def test_teleporter_composes_in_its_graph_module() -> None:
    """A prepared Teleporter keeps its GraphModule: a second teleport multiplies the buffers
    already there (and adds any new Muls); exact-mode ``undo`` of both puts every parameter
    back bit for bit and every buffer at 1."""
    model, x = seeded(Functional, 0), example(8, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = copy.deepcopy(model)
    prepared = Teleporter(model, x, mode="insert")
    kw = {"sampling": "inter_landscape", "cob_range": 0.9, "exact": True}
    first = prepared.teleport(seed=1, **kw)
    second = prepared.teleport(seed=2, **kw)
    assert second.model is first.model and isinstance(first.model, fx.GraphModule)
    assert rel_err(forward(reference, x, False), forward(second.model, x, False)) <= RTOL
    second.undo()
    first.undo()
    for name, t in before.items():
        assert torch.equal(model.state_dict()[name], t), name
    for name in first.inserted:
        buffer = first.model.get_buffer(name)
        assert torch.equal(buffer, torch.ones_like(buffer)), name


def test_graph_module_teleports_again() -> None:
    """The GraphModule a teleport returned is a module like any other: teleporting it again
    (its cofactor buffers are constants to the analysis) keeps the function."""
    model, x = seeded(Functional, 0), example(8, 6)
    reference = copy.deepcopy(model)
    first = teleport(model, x, seed=0, **INTER)
    second = assert_preserved(first.model, x, RTOL, seed=1, **INTER)
    assert rel_err(forward(reference, x, False), forward(second.model, x, False)) <= RTOL


def test_graph_module_whatever_the_draw() -> None:
    """Whether a GraphModule is needed, and which Muls it has, depends on the module, not the
    draw: with positive cofactors (ReLU commutes with them) functional ReLUs still get their
    Muls, with constants 1, so a state dict from a teleport with negative cofactors loads."""
    x = example(4, 3, 8, 8)
    positive = teleport(seeded(ReLUs, 0), x, mode="insert", seed=0)
    assert (positive.tau > 0).all() and isinstance(positive.model, fx.GraphModule)
    assert positive.inserted
    for name in positive.inserted:
        assert bool((positive.model.get_buffer(name) == 1).all()), name
    negative = teleport(seeded(ReLUs, 1), x, seed=1, **INTER)
    assert (negative.tau < 0).any() and negative.inserted == positive.inserted
    reload(negative.model, positive.model)
    assert torch.equal(forward(negative.model, x, False)[0], forward(positive.model, x, False)[0])
