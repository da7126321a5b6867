"""The package's structure (issue 13): the analysis has one public face, no private name
crosses a module boundary, ``S = Π τ^e`` is computed in one module, and no import cycles
(each submodule of :mod:`graphteleport.torch` imports first in a fresh interpreter).

The checks read the source with :mod:`ast`, so they see every import, also those inside
functions; a check that finds nothing to look at fails rather than passes.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import FrozenInstanceError, fields
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import graphteleport
import graphteleport.analysis as analysis
from graphteleport.analysis.constraints import Constraints
from graphteleport.analysis.context import Context
from graphteleport.analysis.graphinfo import GraphInfo

PACKAGE = Path(graphteleport.__file__).parent
ANALYSIS = "graphteleport.analysis"
PUBLIC = frozenset(analysis.__all__)
WORKING_STATE = (Context, Constraints, GraphInfo)


def sources() -> Iterator[tuple[str, ast.Module]]:
    """Every module of the package: its dotted name and its syntax tree."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, ast.parse(path.read_text(), filename=str(path))


def imported_from(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_package = (PACKAGE.parent / Path(*base) / "__init__.py").exists()
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join([*base, node.module] if node.module else base)


def module_aliases(module: str, tree: ast.Module) -> dict[str, str]:
    """Local names bound to graphteleport modules (``import graphteleport.x as m``,
    ``from graphteleport import x``), with the module each names."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("graphteleport") and alias.asname:
                    out[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = imported_from(module, node)
            for alias in node.names:
                full = f"{source}.{alias.name}"
                if (PACKAGE.parent / Path(*full.split("."))).exists() or (
                    PACKAGE.parent / Path(*full.split("."))
                ).with_suffix(".py").exists():
                    out[alias.asname or alias.name] = full
    return out


def analysis_imports(module: str, tree: ast.Module) -> list[str]:
    """What ``module`` (outside the analysis) takes from the analysis that is not public:
    submodules, and names the package does not export."""
    bad: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad += [a.name for a in node.names if a.name.startswith(f"{ANALYSIS}.")]
        elif isinstance(node, ast.ImportFrom):
            source = imported_from(module, node)
            if source.startswith(f"{ANALYSIS}."):
                bad.append(source)
            elif source == ANALYSIS:
                bad += [f"{source}.{a.name}" for a in node.names if a.name not in PUBLIC]
    for alias, target in module_aliases(module, tree).items():
        if target == ANALYSIS:
            bad += [
                f"{ANALYSIS}.{n.attr}"
                for n in ast.walk(tree)
                if isinstance(n, ast.Attribute)
                and isinstance(n.value, ast.Name)
                and n.value.id == alias
                and n.attr not in PUBLIC
            ]
    return bad


def private_crossings(module: str, tree: ast.Module) -> list[str]:
    """Private names (``_x``, not dunders) ``module`` takes from another graphteleport
    module: imported by name, or read as an attribute of an imported module."""
    bad: list[str] = []

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = imported_from(module, node)
            if source.startswith("graphteleport") and source != module:
                bad += [f"{source}.{a.name}" for a in node.names if private(a.name)]
    aliases = module_aliases(module, tree)
    for n in ast.walk(tree):
        if (
            isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name)
            and n.value.id in aliases
            and private(n.attr)
        ):
            bad.append(f"{aliases[n.value.id]}.{n.attr}")
    return bad


def test_only_public_names_of_the_analysis_leave_it() -> None:
    """No module outside ``graphteleport/analysis/`` imports an analysis submodule or a
    name the package does not export; the exports hold no working state."""
    assert not PUBLIC & {t.__name__ for t in WORKING_STATE}
    checked = 0
    bad: dict[str, list[str]] = {}
    for module, tree in sources():
        if module == ANALYSIS or module.startswith(f"{ANALYSIS}."):
            continue
        checked += 1
        if found := analysis_imports(module, tree):
            bad[module] = found
    assert checked >= 10, "found too few modules to check"
    assert not bad, f"imports from inside the analysis: {bad}"


def test_no_private_name_crosses_a_module_boundary() -> None:
    bad = {m: found for m, tree in sources() if (found := private_crossings(m, tree))}
    assert not bad, f"private names used across modules: {bad}"


def test_the_checks_see_what_they_look_for() -> None:
    """The scans flag the imports they forbid (so a clean run means something)."""
    tree = ast.parse(
        "from graphteleport.analysis.context import align\n"
        "from graphteleport.analysis import Context, analyze_model\n"
        "from graphteleport import analysis as an\n"
        "from graphteleport.insertion import _Inserter\n"
        "import graphteleport.rewrite as rw\n"
        "x = an.driver\n"
        "y = rw._apply\n"
    )
    assert analysis_imports("graphteleport.other", tree) == [
        "graphteleport.analysis.context",
        "graphteleport.analysis.Context",
        "graphteleport.analysis.driver",
    ]
    assert sorted(private_crossings("graphteleport.other", tree)) == [
        "graphteleport.insertion._Inserter",
        "graphteleport.rewrite._apply",
    ]


def test_the_product_of_factors_is_taken_in_one_module() -> None:
    """``S = Π τ[ids]^e`` — a power of a factor's cofactors — is written out only in
    :mod:`graphteleport.algebra` (the issue's grep)."""
    power = re.compile(r"\*\* *f\.exp|\*\*f\.exp|t\*\*|\.exp ==")
    where = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if power.search(path.read_text())
    )
    assert where == ["algebra.py"]


def _mlp() -> ir.Model:
    w0 = helper.make_tensor("W0", TensorProto.FLOAT, [4, 3], np.arange(12.0) + 1)
    w1 = helper.make_tensor("W1", TensorProto.FLOAT, [2, 4], np.arange(8.0) + 1)
    nodes = [
        helper.make_node("Gemm", ["x", "W0"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "W1"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [w0, w1],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.from_proto(onnx.shape_inference.infer_shapes(model))


def test_the_result_carries_no_working_state() -> None:
    """``analyze_model`` hands on a frozen result: no field (nor an element of a field)
    is the rules' context, the constraint store or the graph's index."""
    result = analysis.analyze_model(_mlp())
    assert isinstance(result, analysis.AnalysisResult)
    seen = 0
    for f in fields(result):
        value = getattr(result, f.name)
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            seen += 1
            assert not isinstance(item, WORKING_STATE), f.name
            for attr in getattr(type(item), "__slots__", ()):
                assert not isinstance(getattr(item, attr, None), WORKING_STATE), (f.name, attr)
    assert seen > 5
    assert result.free_cofactors == 4
    assert set(result.neurons) >= {"h", "r"}
    assert [w.name for w in result.weights] == ["W0", "W1"]
    with pytest.raises(FrozenInstanceError):
        result.solution = result.solution  # type: ignore[misc]


TORCH_SUBMODULES = sorted(
    f"graphteleport.torch.{path.stem}"
    for path in (PACKAGE / "torch").glob("*.py")
    if path.stem != "__init__"
)


@pytest.mark.parametrize("module", TORCH_SUBMODULES)
def test_each_torch_submodule_imports_first(module: str) -> None:
    """Each submodule of :mod:`graphteleport.torch`, imported first in a fresh interpreter,
    loads: an import cycle fails here (and in :func:`test_no_import_cycle_at_load_time`)."""
    pytest.importorskip("torch")
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        cwd=PACKAGE.parent,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_torch_package_has_its_submodules() -> None:
    """The import test above sees the package (an empty parametrization would skip)."""
    assert {"tracing", "absorb", "insert", "orbit"} <= {
        m.rpartition(".")[2] for m in TORCH_SUBMODULES
    }


def load_time_imports(module: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The graphteleport modules ``module`` imports when it is loaded: its top-level
    imports (also under ``if``/``try``), not those in functions or under
    ``if TYPE_CHECKING:``."""
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for st in body:
            if isinstance(st, ast.If) and "TYPE_CHECKING" in ast.unparse(st.test):
                continue
            if isinstance(st, ast.If):
                visit(st.body + st.orelse)
            elif isinstance(st, ast.Try):
                visit(st.body + st.orelse + st.finalbody)
                for handler in st.handlers:
                    visit(handler.body)
            elif isinstance(st, ast.Import):
                out.update(a.name for a in st.names)
            elif isinstance(st, ast.ImportFrom):
                source = imported_from(module, st)
                out.update(
                    f"{source}.{a.name}" if f"{source}.{a.name}" in known else source
                    for a in st.names
                )

    visit(tree.body)
    return (out & known) - {module}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles a depth-first search of ``graph`` runs into (each as a closed path)."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    found: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, path)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_no_import_cycle_at_load_time() -> None:
    """No graphteleport module imports (at load time) one that imports it back."""
    trees = dict(sources())
    known = set(trees)
    graph = {m: load_time_imports(m, tree, known) for m, tree in trees.items()}
    assert sum(map(len, graph.values())) > 20, "found too few imports to check"
    assert import_cycles(graph) == []
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
