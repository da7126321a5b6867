"""The symmetry analysis as a whole: teleportation dimensions and the quiver's structure."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import gemm_mlp, make_model, rand
from onnx import helper

from graphteleport.analysis import PinGroup, Quiver, analyze, analyze_model
from graphteleport.io import load_model

N = helper.make_node


def residual_gemm_net(
    depth: int, width: int, fan_in: int = 10, classes: int = 3
) -> onnx.ModelProto:
    """``h0 = relu(stem x)``, ``h_{k+1} = h_k + relu(fc_k h_k)`` for k < depth, ``y = head h``."""
    inits = {
        "Ws": rand([fan_in, width], 0),
        "bs": rand([width], 1),
        "Wh": rand([width, classes], 2),
        "bh": rand([classes], 3),
    }
    nodes = [N("Gemm", ["x", "Ws", "bs"], ["s"]), N("Relu", ["s"], ["h0"])]
    for k in range(depth):
        inits[f"W{k}"] = rand([width, width], 10 + k) * np.float32(0.3)
        inits[f"b{k}"] = rand([width], 20 + k)
        nodes += [
            N("Gemm", [f"h{k}", f"W{k}", f"b{k}"], [f"z{k}"]),
            N("Relu", [f"z{k}"], [f"r{k}"]),
            N("Add", [f"h{k}", f"r{k}"], [f"h{k + 1}"]),
        ]
    nodes.append(N("Gemm", [f"h{depth}", "Wh", "bh"], ["y"]))
    return make_model(nodes, {"x": [1, fan_in]}, {"y": [1, classes]}, inits)


# -- teleportation dimensions -----------------------------------------------------------------
def test_5x500_relu_mlp_has_2500_free_cofactors() -> None:
    """The paper's 5×500 ReLU MLP: one free cofactor per hidden neuron, 5 · 500 = 2500
    (input and output neurons keep τ = 1), all in the positive group (ReLU)."""
    proto = gemm_mlp([784, 500, 500, 500, 500, 500, 10], "Relu", batch=1)
    q = analyze(ir.from_proto(proto))
    assert q.free_cofactors == 2500
    assert q.groups() == {"positive": 2500}


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_exported_5x500_mlp_has_2500_free_cofactors(exported, exporter: str) -> None:
    """The same count on ``models.architectures.mlp(5, 500)`` exported by torch."""
    q = analyze(load_model(exported("mlp_5x500", exporter)))
    assert q.free_cofactors == 2500
    assert q.groups() == {"positive": 2500}


def test_residual_relu_net_ties_every_block_to_the_stem() -> None:
    """``h_{k+1} = h_k + relu(W_k h_k + b_k)``: the Add says ``τ(h_k) = τ(relu(W_k h_k))`` neuron
    by neuron (both summands must scale alike for the sum to scale), and its output *is*
    ``h_{k+1}``.  By induction every block's 8 hidden neurons share the stem's 8 cofactors:
    the 4 + 1 hidden layers of 8 neurons have 8 free cofactors, not 40."""
    q = analyze(ir.from_proto(residual_gemm_net(depth=4, width=8)))
    assert q.free_cofactors == 8
    assert q.groups() == {"positive": 8}
    assert q.neurons == 1 + 8 + 4 * 8 + 3  # input, stem, blocks, head (Adds add no neurons)


def test_exported_residual_mlp_reports_the_reduced_count(exported) -> None:
    """``models`` registry ``residual_mlp`` = ResidualMLP(depth=4, width=64): a stem
    Linear(784, 64)+ReLU and 4 blocks ``h + relu(Linear(64, 64)(h))``.  Each residual Add ties
    its block's output neurons to its input neurons one to one, so all 5 hidden layers share
    the stem's 64 cofactors: 64 free, where the same layers without the Adds have 5 · 64 = 320."""
    q = analyze(load_model(exported("residual_mlp")))
    assert q.free_cofactors == 64
    assert q.groups() == {"positive": 64}
    plain = analyze(load_model(exported("mlp")))  # mlp(depth=3, width=64): 3 · 64
    assert plain.free_cofactors == 192


def test_analysis_exposes_solution_and_absorbs() -> None:
    """Every weight and bias of a 4 → 6 → 5 → 3 Gemm MLP absorbs a scaling (6 absorbs); the
    solution's free pairs are the 11 hidden neurons."""
    a = analyze_model(ir.from_proto(gemm_mlp([4, 6, 5, 3])))
    assert sorted(ab.source.name for ab in a.absorbs) == ["W0", "W1", "W2", "b0", "b1", "b2"]
    assert int(a.solution.free.sum()) == 11
    assert a.solution.n == 15
    per_neuron = a.solution.cofactors(np.full(a.solution.num_pairs, 2.0))
    assert per_neuron.shape == (15,)


# -- the quiver -----------------------------------------------------------------------------
@pytest.fixture
def small_quiver() -> Quiver:
    """x[2, 4] → fc0 (6) → Relu → fc1 (5) → Relu → fc2 (3) → y."""
    return analyze(ir.from_proto(gemm_mlp([4, 6, 5, 3])))


def test_quiver_vertices_are_layers(small_quiver: Quiver) -> None:
    """One vertex per neuron group: the input (one pinned neuron, broadcast over its 4
    features), the two hidden layers (free, positive) and the output (pinned)."""
    g = small_quiver.graph
    nodes = {d["name"]: d for _, d in g.nodes(data=True)}
    assert set(nodes) == {"x", "h0", "h1", "y"}
    assert [nodes[n]["size"] for n in ("x", "h0", "h1", "y")] == [1, 6, 5, 3]
    assert [nodes[n]["free"] for n in ("x", "h0", "h1", "y")] == [0, 6, 5, 0]
    assert nodes["h0"]["groups"] == {"positive": 6}
    assert nodes["y"]["pinned"] == {"graph output": 3}
    assert nodes["x"]["pinned"] == {"graph input": 1}
    assert [nodes[n]["biases"] for n in ("h0", "h1", "y")] == [["b0"], ["b1"], ["b2"]]


def test_quiver_arrows_are_weights(small_quiver: Quiver) -> None:
    """One arrow per weight matrix, from its source layer's vertex to its target's."""
    g = small_quiver.graph
    name = {v: d["name"] for v, d in g.nodes(data=True)}
    arrows = sorted((name[s], name[t], k) for s, t, k in g.edges(keys=True))
    assert arrows == [("h0", "h1", "W1"), ("h1", "y", "W2"), ("x", "h0", "W0")]


def test_quiver_counts_match_its_graph(small_quiver: Quiver) -> None:
    """The report's counts (no networkx) are the drawn graph's."""
    assert small_quiver.vertex_count == small_quiver.graph.number_of_nodes() == 4
    assert small_quiver.arrow_count == small_quiver.graph.number_of_edges() == 3


def test_to_neurons_expands_to_the_papers_quiver(small_quiver: Quiver) -> None:
    """Neuron level: 1 + 6 + 5 + 3 = 15 vertices; arrows 1·6 + 6·5 + 5·3 = 51 (the input's
    one neuron stands for its 4 broadcast features)."""
    g = small_quiver.to_neurons()
    assert g.number_of_nodes() == 15
    assert g.number_of_edges() == 51
    groups = [d["group"] for _, d in g.nodes(data=True)]
    assert groups.count("positive") == 11 and groups.count("pinned") == 4


def test_to_neurons_follows_ties() -> None:
    """In the residual net the blocks' neurons are separate vertices with shared pairs."""
    q = analyze(ir.from_proto(residual_gemm_net(depth=2, width=3)))
    g = q.to_neurons()
    assert g.number_of_nodes() == q.neurons == 1 + 3 + 2 * 3 + 3
    free_pairs = {d["pair"] for _, d in g.nodes(data=True) if d["group"] == "positive"}
    assert len(free_pairs) == 3


def test_pinned_groups_by_reason(small_quiver: Quiver) -> None:
    pins = small_quiver.pinned()
    assert all(isinstance(p, PinGroup) for p in pins)
    by_reason = {p.reason: p for p in pins}
    assert set(by_reason) == {"graph input", "graph output"}
    assert (by_reason["graph output"].cofactors, by_reason["graph output"].neurons) == (3, 3)
    assert by_reason["graph output"].values == ["y"]
    assert by_reason["graph output"].to_dict()["reason"] == "graph output"


def test_sign_and_pinned_groups_in_one_model() -> None:
    """fc0 → Tanh (6 neurons, sign group) → fc1 → Sigmoid (5, pinned) → fc2 → y."""
    q = analyze(ir.from_proto(gemm_mlp([4, 6, 5, 3], ["Tanh", "Sigmoid"])))
    assert q.free_cofactors == 6
    assert q.groups() == {"sign": 6}
    reasons = {p.reason: p.cofactors for p in q.pinned()}
    assert reasons["Sigmoid is not equivariant (use --mode insert)"] == 5


def test_input_shapes_make_a_dynamic_batch_concrete() -> None:
    proto = gemm_mlp([4, 6, 5, 3])
    for vi in (proto.graph.input[0], proto.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
    q = analyze(ir.from_proto(proto), input_shapes={"x": [7, 4]})
    assert q.free_cofactors == 11


def test_dynamic_batch_without_input_shapes_is_analysed() -> None:
    """A dynamic batch axis is analysed at batch 1 (the cofactors do not depend on it)."""
    proto = gemm_mlp([4, 6, 5, 3])
    for vi in (proto.graph.input[0], proto.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
    q = analyze(ir.from_proto(proto))
    assert q.free_cofactors == 11


def test_analysis_does_not_modify_the_model() -> None:
    proto = gemm_mlp([4, 6, 5, 3])
    model = ir.from_proto(proto)
    before = ir.to_proto(model).SerializeToString()
    analyze(model)
    assert ir.to_proto(model).SerializeToString() == before


def test_factor_table_moved_with_empty_factors() -> None:
    """``moved`` flags each factor with an element off 1, also when factors are empty (in
    the middle and at the end, where reduceat needs its sentinel)."""
    from graphteleport.algebra import FactorTable
    from graphteleport.analysis import Absorb, ConstRef, Factor

    def absorb(*ids: list[int]) -> Absorb:
        factors = [Factor(np.asarray(i, dtype=np.int64), 1) for i in ids]
        return Absorb(ConstRef("w", None), (len(ids[0]),), factors, None, 1)

    for layout in ([[0, 1], [], [2]], [[0], [1, 2], []], [[], [0, 1, 2]], [[2], [], []]):
        table = FactorTable([absorb(*layout)])
        for off in range(3):
            tau = np.ones(3)
            tau[off] = 2.0
            want = [off in ids for ids in layout]
            assert table.moved(table.values(tau)) == want, (layout, off)
        assert table.moved(table.values(np.ones(3))) == [False] * len(layout)


def test_group_codes_of_every_flag_set() -> None:
    """PIN, or POSITIVE with SIGN, leaves τ = 1 (pinned); SIGN alone ±1; POSITIVE alone
    τ > 0; no flag: any τ — for every combination of the three bits."""
    from graphteleport.analysis.constraints import Flag
    from graphteleport.analysis.solve import GROUPS, group_codes

    flags = np.arange(8)
    got = [GROUPS[c] for c in group_codes(flags)]
    for f, group in zip(flags.tolist(), got):
        pin, pos, sign = (bool(f & b) for b in (Flag.PIN, Flag.POSITIVE, Flag.SIGN))
        want = (
            "pinned" if pin or (pos and sign) else "sign" if sign else "positive" if pos else "any"
        )
        assert group == want, (f, group, want)


def _counted_figures(q: Quiver) -> tuple[list[dict[str, object]], dict[str, int], list[object]]:
    """The quiver's figures counted directly from their definitions, pair by pair and
    neuron by neuron (Counter in pair order), to check the vectorised counts against."""
    from collections import Counter

    sol = q.analysis.solution
    pinned = sol.pinned & sol.touched
    vertices = []
    for vid in sorted(q.vertices):
        pairs = sorted(set(sol.pair[q.group_of == vid].tolist()))
        vertices.append({
            "free": sum(bool(sol.free[p]) for p in pairs),
            "groups": dict(Counter(str(sol.group[p]) for p in pairs if sol.free[p])),
            "pinned": dict(Counter(sol.reason[p] for p in pairs if pinned[p])),
        })  # fmt: skip
    groups = dict(Counter(str(g) for g, f in zip(sol.group, sol.free) if f))
    count = Counter(sol.reason[p] for p in range(sol.num_pairs) if pinned[p])
    neurons = Counter(sol.reason[p] for p in sol.pair.tolist() if pinned[p])
    values: dict[str, list[str]] = {}
    for name, ids in q.analysis.neurons.items():
        for r in {sol.reason[p] for p in sol.pair[ids.reshape(-1)].tolist() if pinned[p]}:
            values.setdefault(r, []).append(name)
    pins = [(r, c, neurons[r], values[r]) for r, c in count.most_common()]
    return vertices, groups, pins


def _residual_tanh_sigmoid() -> onnx.ModelProto:
    proto = residual_gemm_net(depth=3, width=4)
    for node in proto.graph.node:  # a Tanh (sign) and a Sigmoid (pinned in absorb mode)
        if node.output[0] in ("r0", "r2"):
            node.op_type = "Tanh" if node.output[0] == "r0" else "Sigmoid"
    return proto


@pytest.mark.parametrize("mode", ["absorb", "insert"])
@pytest.mark.parametrize("residual", [False, True])
def test_the_quivers_figures_are_the_counts_by_their_definitions(mode: str, residual: bool) -> None:
    """Vertices' free / groups / pinned, the free cofactors by group and the pins by
    reason (their order too: most cofactors first, ties in pair order) as counted neuron
    by neuron: an MLP with sign, positive and pinned (several reasons) layers, and a
    residual net whose blocks merge into one vertex."""
    if residual:
        proto = _residual_tanh_sigmoid()
    else:
        proto = gemm_mlp([4, 6, 5, 4, 3], ["Tanh", "Relu", "Sigmoid"])
    q = analyze(ir.from_proto(proto), mode=mode)
    vertices, groups, pins = _counted_figures(q)
    got = [{k: q.vertices[v][k] for k in ("free", "groups", "pinned")} for v in sorted(q.vertices)]
    assert got == vertices
    assert q.groups() == groups and list(q.groups()) == list(groups)
    assert [(p.reason, p.cofactors, p.neurons, p.values) for p in q.pinned()] == pins
    if not residual and mode == "absorb":  # (the model exercises several of each)
        assert list(groups) == ["sign", "positive"] and len(pins) == 3
