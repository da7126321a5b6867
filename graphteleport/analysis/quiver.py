"""The quiver: neuron groups and the weights between them, as a networkx graph.

A *neuron group* is a set of neurons created together by a rule (a layer's
outputs, a norm's outputs, a graph input), merged with every other group it
shares a cofactor with (a residual Add merges the groups it adds).  Each vertex
carries its size, its number of free cofactors, its groups (any / positive /
sign / pinned) and, for pinned cofactors, the reasons.  Each arrow is a weight
tensor from the group of its source neurons to the group of its target neurons
(``W' = τ_t · W / τ_s``); a bias or an embedding table, which has targets only,
is listed on its target vertex.

:meth:`Quiver.to_neurons` expands it to the paper's neuron-level quiver (one
vertex per neuron, one arrow per distinct source → target pair of a weight), for
small models.

Example::

    q = Quiver.from_analysis(analyze_model(model))
    q.free_cofactors        # the teleportation dimension
    q.graph.nodes(data=True)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from graphteleport.analysis.constraints import Absorb, Block
from graphteleport.analysis.result import AnalysisResult
from graphteleport.analysis.solve import GROUPS
from graphteleport.unionfind import components

if TYPE_CHECKING:
    import networkx as nx

#: An arrow of the quiver: (source vertex, target vertex, weight name) -> its attributes.
Arrows = dict[tuple[int, int, str], dict[str, Any]]

MAX_NEURON_QUIVER = 200_000


@dataclass
class PinGroup:
    """Cofactors pinned for one reason, and the values whose neurons they hold."""

    reason: str
    cofactors: int
    neurons: int
    values: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "cofactors": self.cofactors,
            "neurons": self.neurons,
            "values": self.values,
        }


class Quiver:
    """Neuron groups and weights of an analysed model (see the module docstring).

    The vertices and arrows are plain data; :attr:`graph` draws them as a networkx
    ``MultiDiGraph`` when first asked (networkx is imported then: a teleport's report
    needs only the counts, :attr:`vertex_count` and :attr:`arrow_count`).
    """

    def __init__(
        self,
        analysis: AnalysisResult,
        vertices: dict[int, dict[str, Any]] | Callable[[], dict[int, dict[str, Any]]],
        arrows: Arrows,
        group_of: np.ndarray,
        reasons: _ReasonCodes | None = None,
    ) -> None:
        """``vertices``: the vertices, or a function that makes them when first asked
        (:meth:`from_analysis`: a teleport's report needs only their number)."""
        self.analysis = analysis
        self._vertices = vertices if isinstance(vertices, dict) else None
        self._make_vertices = None if isinstance(vertices, dict) else vertices
        self.arrows = arrows
        self.group_of = group_of  # per neuron: its vertex
        self._reasons = reasons  # the pairs' reasons as codes (made on first use if None)

    @property
    def vertices(self) -> dict[int, dict[str, Any]]:
        """Per vertex id: its attributes (name, ops, size, free, groups, pinned, biases)."""
        if self._vertices is None:
            assert self._make_vertices is not None
            self._vertices = self._make_vertices()
        return self._vertices

    @property
    def reason_codes(self) -> _ReasonCodes:
        """The cofactor pairs' reasons as integer codes (:class:`_ReasonCodes`)."""
        if self._reasons is None:
            self._reasons = _ReasonCodes.of(self.analysis.solution.reason)
        return self._reasons

    @cached_property
    def graph(self) -> nx.MultiDiGraph:
        """The quiver as a networkx graph: a vertex per neuron group (its attributes: name,
        ops, size, free, groups, pinned, biases), an arrow per weight between groups
        (keyed by the weight's name; attributes weight and node)."""
        import networkx as nx

        g = nx.MultiDiGraph()
        g.add_nodes_from(self.vertices.items())
        for (s, t, key), attrs in self.arrows.items():
            g.add_edge(s, t, key=key, **attrs)
        return g

    @property
    def vertex_count(self) -> int:
        """Neuron groups (the graph's vertices; counted without making them)."""
        if self._vertices is not None:
            return len(self._vertices)
        return int(np.unique(self.group_of).size)

    @property
    def arrow_count(self) -> int:
        """Weights between groups (the graph's arrows)."""
        return len(self.arrows)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_analysis(cls, analysis: AnalysisResult) -> Quiver:
        """The quiver of ``analysis``; its vertices' attributes are made when first
        asked (:meth:`_vertices_of`), the arrows now."""
        blocks = analysis.blocks
        sol = analysis.solution
        block_of = np.repeat(np.arange(len(blocks)), [b.size for b in blocks])
        group_of = _merge_blocks(block_of, sol.pair, len(blocks))
        reasons = _ReasonCodes.of(sol.reason)
        arrows: Arrows = {}
        biases: dict[int, list[str]] = defaultdict(list)
        for ab in analysis.absorbs:
            _add_weight(biases, arrows, ab, group_of)

        def vertices() -> dict[int, dict[str, Any]]:
            return _vertices_of(analysis, block_of, group_of, reasons, biases)

        return cls(analysis, vertices, arrows, group_of, reasons)

    # -- figures ------------------------------------------------------------------------
    @property
    def free_cofactors(self) -> int:
        """The teleportation dimension: cofactors that are free and move some weight."""
        return self.analysis.free_cofactors

    @property
    def neurons(self) -> int:
        return int(self.analysis.solution.n)

    def groups(self) -> dict[str, int]:
        """Free cofactors by the group they range over (in the order the pairs first
        name each group)."""
        sol = self.analysis.solution
        return _tally(sol.code[sol.free], GROUPS)

    def pinned(self) -> list[PinGroup]:
        """Pinned cofactors grouped by reason, most cofactors first (ties: the reason
        of the lowest pair first); each with its pinned neurons and the values whose
        neurons it pins (in the analysis's order)."""
        sol = self.analysis.solution
        pinned = sol.pinned & sol.touched
        codes, names = self.reason_codes.codes, self.reason_codes.names
        count = _tally(codes[pinned], names)
        pin_pair = sol.pair[pinned[sol.pair]]  # the pinned pair of every pinned neuron
        neurons = np.bincount(codes[pin_pair], minlength=len(names))
        values: dict[str, list[str]] = defaultdict(list)
        for name, ids in self.analysis.neurons.items():
            pairs = sol.pair[ids.reshape(-1)]
            for code in np.unique(codes[pairs[pinned[pairs]]]).tolist():
                values[names[code]].append(name)
        ranked = sorted(count.items(), key=lambda kv: kv[1], reverse=True)  # (stable)
        index = {r: k for k, r in enumerate(names)}
        groups = [PinGroup(r, c, int(neurons[index[r]]), values[r]) for r, c in ranked]
        if not groups and not sol.touched.any():  # no cofactor at all: say why
            groups = [PinGroup(self.analysis.nothing_to_rescale, 0, self.neurons, [])]
        return groups

    def to_neurons(self) -> nx.DiGraph:
        """The neuron-level quiver: a vertex per neuron, an arrow per weight entry."""
        import networkx as nx

        sol = self.analysis.solution
        if sol.n > MAX_NEURON_QUIVER:
            raise ValueError(f"{sol.n} neurons: too many for a neuron-level quiver")
        g = nx.DiGraph()
        for k in range(sol.n):
            g.add_node(k, pair=int(sol.pair[k]), group=sol.group[sol.pair[k]])
        for ab in self.analysis.absorbs:
            src = [f.ids for f in ab.factors if f.exp < 0]
            dst = [f.ids for f in ab.factors if f.exp > 0]
            if len(src) == 1 and len(dst) == 1:
                s, t = np.broadcast_arrays(src[0], dst[0])
                for a, b in set(zip(s.reshape(-1).tolist(), t.reshape(-1).tolist())):
                    g.add_edge(a, b, weight=ab.source.name)
        return g


def _merge_blocks(block_of: np.ndarray, pair: np.ndarray, count: int) -> np.ndarray:
    """Vertex of each neuron: blocks that share a cofactor pair merge."""
    order = np.argsort(pair, kind="stable")
    same = pair[order][1:] == pair[order][:-1]
    labels = components(max(count, 1), block_of[order][:-1][same], block_of[order][1:][same])
    out: np.ndarray = labels[block_of]
    return out


def _vertices_of(
    analysis: AnalysisResult,
    block_of: np.ndarray,
    group_of: np.ndarray,
    reasons: _ReasonCodes,
    biases: dict[int, list[str]],
) -> dict[int, dict[str, Any]]:
    """Every vertex's attributes: its members found by one stable sort of the neurons by
    vertex (not a scan of every neuron per vertex), its figures by :func:`_tally` of
    integer codes (32-layer LLaMA, 2.6 M neurons in 293 vertices: the quiver and the
    report's figures 3.9 → 0.5 s)."""
    blocks = analysis.blocks
    vertices: dict[int, dict[str, Any]] = {}
    order = np.argsort(group_of, kind="stable")  # (members of a vertex: ascending ids)
    vids, starts = np.unique(group_of[order], return_index=True)
    for vid, members in zip(vids.tolist(), np.split(order, starts[1:])):
        blocks_in = [blocks[k] for k in np.unique(block_of[members])]
        vertices[vid] = _vertex(analysis, members, blocks_in, reasons, biases.get(vid, []))
    return vertices


def _vertex(
    analysis: AnalysisResult,
    members: np.ndarray,
    blocks: list[Block],
    reasons: _ReasonCodes,
    biases: list[str],
) -> dict[str, Any]:
    sol = analysis.solution
    pairs = np.unique(sol.pair[members])
    free = pairs[sol.free[pairs]]
    pinned = pairs[sol.pinned[pairs] & sol.touched[pairs]]
    return {
        "name": blocks[0].name if blocks else "",
        "ops": sorted({b.op for b in blocks if b.op}),
        "size": int(members.size),
        "free": int(free.size),
        "groups": _tally(sol.code[free], GROUPS),
        "pinned": _tally(reasons.codes[pinned], reasons.names),
        "biases": list(biases),
    }


@dataclass(frozen=True)
class _ReasonCodes:
    """Per cofactor pair, its reason as an index (``codes``) into the distinct reasons
    (``names``, in the order the pairs first give them)."""

    codes: np.ndarray
    names: list[str]

    @classmethod
    def of(cls, reasons: Sequence[str]) -> _ReasonCodes:
        """By runs: neighbouring pairs mostly share a reason (the 32-layer LLaMA's 1.8 M
        pairs: 165 runs), so only each run's first reason is looked up."""
        if not reasons:
            return cls(np.zeros(0, np.int64), [])
        texts = np.empty(len(reasons), dtype=object)
        texts[:] = reasons
        heads = np.flatnonzero(np.concatenate(([True], texts[1:] != texts[:-1])))
        index: dict[str, int] = {}
        firsts = [index.setdefault(r, len(index)) for r in texts[heads].tolist()]
        runs = np.diff(np.append(heads, texts.size))
        return cls(np.repeat(np.asarray(firsts, dtype=np.int64), runs), list(index))


def _tally(codes: np.ndarray, names: Sequence[str]) -> dict[str, int]:
    """``Counter(names[c] for c in codes)`` as a dict, by one sort of the integer codes:
    each name's count, in the order ``codes`` first gives it (``names`` distinct)."""
    if codes.size == 0:
        return {}
    uniq, first, counts = np.unique(codes, return_index=True, return_counts=True)
    return {str(names[uniq[k]]): int(counts[k]) for k in np.argsort(first, kind="stable")}


def _add_weight(
    biases: dict[int, list[str]], arrows: Arrows, ab: Absorb, group_of: np.ndarray
) -> None:
    """Draw one use of a weight: an arrow from each source group to each target group (one
    per weight name and pair, as a MultiDiGraph keyed by name), or a bias of its targets."""
    src = {int(v) for f in ab.factors if f.exp < 0 for v in np.unique(group_of[f.ids])}
    dst = {int(v) for f in ab.factors if f.exp > 0 for v in np.unique(group_of[f.ids])}
    if not src:
        for t in dst:
            biases[t].append(ab.source.name)
        return
    for s in src:
        for t in dst:
            arrows[(s, t, ab.source.name)] = {"weight": ab.source.name, "node": ab.node.name}
