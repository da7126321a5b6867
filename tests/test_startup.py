"""The command's start-up: sympy is imported where onnx_ir first needs it, if ever
(graphteleport.startup), and onnx_ir behaves as when imported plainly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models" / "onnx"

# Symbolic dimensions' arithmetic, parsing and comparisons, printed: the same text whether
# onnx_ir was imported plainly or with sympy deferred.
_USE = """
import onnx_ir as ir
n = ir.SymbolicDim("N")
print("before use:", "sympy" in sys.modules)
print(repr(n), repr(n + 1), repr(2 * n - 3), repr(n // 2), repr((n + 1) * n))
print(n == "N", n + 1 == ir.SymbolicDim("N + 1"), ir.SymbolicDim("max(N, 4)")._expr)
import sympy
print(repr(ir.SymbolicDim(sympy.Symbol("M") * 2)), isinstance(n._expr, sympy.Expr))
print("after use:", "sympy" in sys.modules)
"""


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_onnx_ir_with_sympy_deferred_behaves_as_imported_plainly() -> None:
    deferred = _python(
        "import sys\nfrom graphteleport.startup import import_onnx_ir\nimport_onnx_ir()\n" + _USE
    )
    plain = _python("import sys\n" + _USE)
    assert deferred.splitlines()[0] == "before use: False"
    assert plain.splitlines()[0] == "before use: True"
    assert deferred.splitlines()[1:] == plain.splitlines()[1:]
    assert deferred.splitlines()[-1] == "after use: True"


def test_the_command_does_not_import_sympy(tmp_path: Path) -> None:
    """A verified teleport of a model with a symbolic batch dimension, as the console
    script runs it (``main()`` owning the process): done without sympy."""
    proto = onnx.load(MODELS / "mlp_small.onnx")
    for value in [*proto.graph.input, *proto.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    model = tmp_path / "mlp_batch.onnx"
    onnx.save(proto, model)
    out = _python(
        f"""
        import sys
        from graphteleport.cli import main
        sys.argv = ["graphteleport", {str(model)!r}, "-o", {str(tmp_path / "t.onnx")!r}, "-q"]
        code = main()
        print(code, "sympy" in sys.modules)
        from graphteleport.io import load_model
        print(repr(load_model(sys.argv[3]).graph.inputs[0].shape))
        """
    )
    lines = out.splitlines()
    assert lines[0] == "0 False", out
    assert "batch" in lines[1]  # the teleported model keeps the symbolic dimension
