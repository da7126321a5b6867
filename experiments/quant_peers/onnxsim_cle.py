"""onnxsim's data-free cross-layer equalization: ``onnxsim.cross_layer_equalize``.

Run in the peer's own venv: ``python onnxsim_cle.py IN.onnx OUT.onnx``.
"""

from __future__ import annotations

import sys

import onnx
import onnxsim


def main(src: str, dst: str) -> int:
    model = onnxsim.cross_layer_equalize(onnx.load(src))
    onnx.save(model, dst)
    print(f"onnxsim {onnxsim.__version__}: cross_layer_equalize")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
