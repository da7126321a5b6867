"""AMD Quark's cross-layer equalization for ONNX: ``quark.onnx.algorithm.apply_CLE`` with its
CLEConfig defaults (one step, balance "max"), every op type of the model marked for
quantization.  ``--replace-clip6-relu`` adds the option
``ReplaceClip6Relu`` that Quark's VINT8 preset turns on.

Run in the peer's own venv: ``python quark_cle.py IN.onnx OUT.onnx [--replace-clip6-relu]``.
"""

from __future__ import annotations

import sys
from importlib.metadata import version

import onnx
from quark.onnx.algorithm import apply_CLE


def main(argv: list[str]) -> int:
    src, dst = argv[0], argv[1]
    extra = {"ReplaceClip6Relu": "--replace-clip6-relu" in argv[2:]}
    model = onnx.load(src)
    # every op type of the graph is "to quantize", as in Quark's own flow: apply_CLE's
    # default (None → []) marks no node quantizable and equalizes nothing
    op_types = sorted({n.op_type for n in model.graph.node})
    model = apply_CLE(model, op_types_to_quantize=op_types, extra_options=extra)
    onnx.save(model, dst)
    print(f"amd-quark {version('amd-quark')}: apply_CLE {extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
