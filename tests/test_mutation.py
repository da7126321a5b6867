"""Mutation test of the verifier: every single-neuron corruption of a correct teleport fails.

A correct teleport is made (``TeleportPass``), then for every free hidden neuron ``n`` and
every weight the analysis says ``n`` scales (``W' = W · τ_n^e``), one *mutant* corrupts
just that neuron in just that weight: its incoming weights (``e = +1``, a row of a Gemm, an
output channel of a Conv) or its outgoing weights (``e = −1``) times 1.5, or its bias
(``e = +1`` on a vector) shifted.  Each mutant must fail :func:`verify_teleport` with the
defaults the CLI uses, also where the neuron is dead on every drawn input (outputs alone
pass those: on ``mlp_small``, 100 of 192 such corruptions passed the old one-input check).
And no correct teleport may fail it: the registry models, both modes, five seeds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import ExportCache
from onnx import numpy_helper

from graphteleport import verify
from graphteleport.analysis import Absorb
from graphteleport.frontends import onnx as onnx_frontend
from graphteleport.io import load_model
from graphteleport.passes.teleport import TeleportPass, TeleportResult
from graphteleport.tensorcheck import TensorScales

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "onnx"


@dataclass
class Case:
    """A model, its correct teleport on disk, and what verification needs."""

    src: Path
    out: Path
    result: TeleportResult
    feeds: list[dict[str, np.ndarray]]

    @property
    def scales(self) -> TensorScales:
        return self.result.tensor_scales()

    def verify(self, candidate: Path) -> verify.VerificationResult:
        return verify.verify_teleport(self.src, candidate, self.feeds, self.scales)


def teleported(src: Path, tmp: Path, mode: str = "absorb", seed: int = 0) -> Case:
    model = load_model(src)
    specs = onnx_frontend.input_specs(model)
    feeds = verify.draw_feed_sets(specs, verify.DEFAULT_DRAWS, seed)
    shapes = {k: v.shape for k, v in feeds[0].items()}
    result = TeleportPass(mode=mode, seed=seed, input_shapes=shapes)(model)
    out = tmp / f"teleported_{mode}_{seed}.onnx"
    ir.save(result.model, out)
    return Case(src, out, result, feeds)


@dataclass(frozen=True)
class Mutant:
    weight: str  # initializer name
    neuron: int  # neuron id in the analysis
    kind: str  # incoming / outgoing / bias
    mask: np.ndarray  # elements of the weight that belong to the neuron


def mutants(case: Case) -> Iterator[Mutant]:
    """One mutant per (weight, free neuron, role) the analysis gives."""
    sol = case.result.analysis.solution
    free = sol.free[sol.pair]
    for ab in case.result.analysis.absorbs:
        if not _plain(ab):
            continue
        for f in ab.factors:
            if abs(f.exp) != 1:
                continue
            ids = np.broadcast_to(f.ids, ab.shape)
            kind = "bias" if len(ab.shape) == 1 else ("incoming" if f.exp == 1 else "outgoing")
            for n in np.unique(f.ids):
                if free[n]:
                    yield Mutant(ab.source.name, int(n), kind, ids == n)


def _plain(ab: Absorb) -> bool:
    """An initializer rewritten as a whole, in its own shape (no gather, no expansion)."""
    return not ab.source.is_node and ab.index is None and not ab.expand


def apply(proto: onnx.ModelProto, mutant: Mutant, path: Path) -> bool:
    """Write the teleported model with *mutant* applied; False if it changed nothing."""
    inits = {t.name: t for t in proto.graph.initializer}
    tensor = inits[mutant.weight]
    original = numpy_helper.to_array(tensor)
    w = original.copy()
    mask = np.broadcast_to(mutant.mask, w.shape)
    if mutant.kind == "bias":
        w[mask] += np.float32(0.1 * max(float(np.sqrt(np.mean(w**2))), 0.1))
    else:
        w[mask] *= np.float32(1.5)
    if np.array_equal(w, original):
        return False
    tensor.CopyFrom(numpy_helper.from_array(w, mutant.weight))
    try:
        onnx.save(proto, path)
    finally:
        tensor.CopyFrom(numpy_helper.from_array(original, mutant.weight))
    return True


def assert_every_mutant_fails(case: Case, tmp: Path, minimum: int) -> None:
    base = case.verify(case.out)
    assert base.passed, base.summary()
    proto = onnx.load(case.out)
    caught = escaped = unchanged = 0
    escapes: list[str] = []
    path = tmp / "mutant.onnx"
    for m in mutants(case):
        if not apply(proto, m, path):
            unchanged += 1
            continue
        if case.verify(path).passed:
            escaped += 1
            escapes.append(f"{m.kind} weights of neuron {m.neuron} in {m.weight}")
        else:
            caught += 1
    assert escaped == 0, f"{escaped} of {caught + escaped} corruptions passed: {escapes[:5]}"
    assert caught >= minimum, (caught, unchanged)
    assert unchanged <= 0.01 * caught


@pytest.mark.parametrize(
    ("fixture", "minimum"), [("mlp_small.onnx", 3 * 192), ("resnet_tiny.onnx", 300)]
)
def test_every_single_neuron_corruption_fails_verification(
    tmp_path: Path, fixture: str, minimum: int
) -> None:
    assert_every_mutant_fails(teleported(FIXTURES / fixture, tmp_path), tmp_path, minimum)


@pytest.mark.torch
@pytest.mark.parametrize(("arch", "minimum"), [("cnn2d", 100), ("residual_mlp", 300)])
def test_every_corruption_of_exported_models_fails(
    exported: ExportCache, tmp_path: Path, arch: str, minimum: int
) -> None:
    src = exported(arch, "dynamo", False)
    assert_every_mutant_fails(teleported(src, tmp_path), tmp_path, minimum)


def test_outputs_alone_miss_dead_neurons(tmp_path: Path) -> None:
    """The reason for the per-tensor check: some corruption passes the outputs on 8 draws."""
    case = teleported(FIXTURES / "mlp_small.onnx", tmp_path)
    proto = onnx.load(case.out)
    path = tmp_path / "mutant.onnx"
    missed = 0
    for m in mutants(case):
        if m.kind == "outgoing" and apply(proto, m, path):
            only_outputs = verify.verify_teleport(case.src, path, case.feeds, None)
            missed += only_outputs.passed
    assert missed > 0


def test_failure_names_the_first_tensor_and_node(tmp_path: Path) -> None:
    case = teleported(FIXTURES / "mlp_small.onnx", tmp_path)
    proto = onnx.load(case.out)
    path = tmp_path / "mutant.onnx"
    m = next(m for m in mutants(case) if m.kind == "incoming" and m.weight == "2.weight")
    assert apply(proto, m, path)
    result = case.verify(path)
    assert not result.passed
    assert result.tensors is not None and result.tensors.failure is not None
    failure = result.tensors.failure
    assert (failure.tensor, failure.op_type) == ("linear_1", "Gemm")
    assert "linear_1" in result.summary()


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("mode", ["absorb", "insert"])
def test_no_correct_teleport_fails(exported: ExportCache, tmp_path: Path, mode: str) -> None:
    """Every registry architecture, five seeds: the strong check passes correct teleports."""
    from models.architectures import ARCHITECTURES

    failed = []
    for arch in ARCHITECTURES:
        src = exported(arch, "dynamo", False)
        for seed in range(5):
            case = teleported(src, tmp_path, mode, seed)
            result = case.verify(case.out)
            if not result.passed:
                failed.append(f"{arch} seed {seed}: {result.summary()}")
    assert not failed, failed
