"""AIMET-ONNX's cross-layer equalization: ``aimet_onnx.cross_layer_equalization.equalize_model``
(folds BatchNorms, replaces ReLU6 with ReLU, cross-layer scaling, high-bias fold; in place).

Run in the peer's own venv: ``python aimet_cle.py IN.onnx OUT.onnx``.
"""

from __future__ import annotations

import sys
from importlib.metadata import version

import onnx
from aimet_onnx.cross_layer_equalization import equalize_model


def main(src: str, dst: str) -> int:
    model = onnx.load(src)
    equalize_model(model)
    onnx.save(model, dst)
    print(f"aimet-onnx {version('aimet-onnx')}: equalize_model")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
