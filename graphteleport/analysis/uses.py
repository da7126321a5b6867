"""Every read of a stored tensor, so that absorb mode only rescales what it fully sees.

A rewrite ``W' = W · S`` is right only if every reader of ``W`` expects ``W'``: each
read must be one of the absorbs the rules emitted for ``W`` (whose ``S`` the analysis
made consistent), a read of its shape only (``Shape``, ``Size``, ``CastLike``'s type
input), or a data-movement constant derived from ``W`` whose own reads all qualify
(``Transpose(W)`` used as an LM head writes its scaling back to ``W``).  Anything else —
a node inside an ``If``/``Loop``/``Scan`` body (captured from the outer scope), a call
of a local function, a node whose rule is unknown or failed, a constant computed from
``W`` by another op, a graph output — sees the stored value, as does a caller that
feeds a graph input whose initializer is only a default (IR ≥ 4).  Such a tensor keeps its
value: every factor of its absorbs is pinned, with the first such read as the reason.

A tensor of zeros is exempt (``0 · S = 0``), unless an absorb would broadcast-expand it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from graphteleport.analysis.constraints import Absorb, ConstRef
from graphteleport.analysis.graphinfo import INDEX_OPS, GraphInfo

_SHAPE_READS = frozenset({"Shape", "Size"})
# Before IR 4 every initializer had to be listed as a graph input too: a format rule, not
# a default to override (onnxruntime keeps such initializers constant).
_OVERRIDABLE_FROM_IR = 4


def foreign_read(info: GraphInfo, uses: list[Absorb]) -> str | None:
    """Why the stored tensor of ``uses`` (its absorbs, :func:`driver.by_source`) must keep
    its value, or None when every read of it is one of ``uses`` or reads no element."""
    ref = uses[0].source
    root = ref.stored
    name = ref.name or root.name or "?"
    if root.is_graph_input() and info.model.ir_version >= _OVERRIDABLE_FROM_IR:
        return f"weight {name!r} is a graph input (callers may override it)"
    if len(uses) == 1 and not root.is_graph_output():  # the usual case: one read, absorbed
        reads = root.uses()
        if len(reads) == 1 and reads[0].node is uses[0].node:  # type: ignore[index]
            return None
    absorbed = {(id(ab.node), ab.input_index) for ab in uses}
    reshaped = any(ab.expand for ab in uses)
    why = _first_foreign(info, ref, root, absorbed, reshaped)
    if why is None or (not reshaped and _all_zero(info, root)):
        return None
    return f"weight {name!r} {why}"


def _first_foreign(
    info: GraphInfo,
    ref: ConstRef,
    root: ir.Value,
    absorbed: set[tuple[int, int]],
    reshaped: bool,
) -> str | None:
    """The first read of ``root`` (or of a constant derived from it) that no absorb
    accounts for, described; None when there is none."""
    stack, seen = [root], {id(root)}
    while stack:
        v = stack.pop()
        if v.is_graph_output():
            return "is a graph output" if v is root else f"is a graph output (as {v.name!r})"
        for use in v.uses():
            node, k = use.node, use.idx
            if (id(node), k) in absorbed or _reads_no_element(node, k, reshaped):
                continue
            if node.graph is not info.graph:
                return f"is also read inside {where(info, node)}"
            derived = _derived(info, ref, node, k)
            if derived is None:
                return f"is also read by {_describe(info, node)} (not rescaled there)"
            for out in derived:
                if id(out) not in seen:
                    seen.add(id(out))
                    stack.append(out)
    return None


def _reads_no_element(node: ir.Node, k: int, reshaped: bool) -> bool:
    """``Shape``/``Size`` read only the shape (unchanged unless an absorb expands the
    tensor); ``CastLike`` reads only its second input's type."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in _SHAPE_READS:
        return not reshaped
    return node.op_type == "CastLike" and k == 1


def _derived(info: GraphInfo, ref: ConstRef, node: ir.Node, k: int) -> list[ir.Value] | None:
    """The outputs of a data-movement constant node whose elements map back to ``ref``
    (their absorbs are written back to it), or None."""
    if k != 0 or node.op_type not in INDEX_OPS or id(node) not in info.constant_nodes:
        return None
    outs = list(node.outputs)
    for o in outs:
        src = info.source(o)
        if src is None or src[0].value is not ref.value:
            return None
    return outs


def _all_zero(info: GraphInfo, v: ir.Value) -> bool:
    try:
        return not np.any(info.value(v))
    except Exception:
        return False


def _describe(info: GraphInfo, node: ir.Node) -> str:
    op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
    label = f"{op} {node.name!r}" if node.name else op
    if (node.domain, node.op_type, node.overload) in info.model.functions:
        return f"a call of the local function {label}"
    return label


def where(info: GraphInfo, node: ir.Node) -> str:
    """Where a node of a subgraph lives: ``If 'if0' (then_branch)``, outermost last."""
    owners = _owners(info)
    parts: list[str] = []
    graph = node.graph
    while graph is not None and graph is not info.graph and id(graph) in owners:
        owner, attr = owners[id(graph)]
        parts.append(f"{_describe(info, owner)} ({attr})")
        graph = owner.graph
    return " of ".join(parts) or "a subgraph"


def _owners(info: GraphInfo) -> dict[int, tuple[ir.Node, str]]:
    """Per subgraph (by ``id``): the node and attribute that hold it (memoised)."""
    owners: dict[int, tuple[ir.Node, str]] | None = info.memo.get("subgraph_owners")
    if owners is None:
        owners = info.memo["subgraph_owners"] = {}
        for node in info.graph.all_nodes():
            for name, g in subgraphs(node):
                owners[id(g)] = (node, name)
    return owners


def subgraphs(node: ir.Node) -> Iterable[tuple[str, ir.Graph]]:
    """The node's own subgraphs (one level), with the attribute holding each."""
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            yield attr.name, attr.value
        elif attr.type == ir.AttributeType.GRAPHS:
            for g in attr.value:
                yield attr.name, g
