"""Trained OCR models nobody here made: the three ONNX models of the PyPI wheel
``rapidocr-onnxruntime`` (PP-OCRv4 text detection — a DBNet —, the mobile v2 direction
classifier and the PP-OCRv4 recogniser; 15 MB together, in the ``[test]`` extra).

All three declare dynamic height and width (and batch), so each run below relies on
the ONNX frontend sizing them (tests/test_dynamic.py has the rules): with default
options they must teleport, verify, move most of their weights, and say which input
shape was used.  The rewritten model is then checked independently at the size the
OCR pipeline really runs it at, with a batch of 2.

The package is located with importlib and never imported (importing it loads OpenCV).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_ort

from graphteleport.cli import main
from graphteleport.frontends.onnx import LADDER


def _models_dir() -> Path | None:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


MODELS = _models_dir()
if MODELS is None:
    pytest.skip(
        "rapidocr-onnxruntime is not installed (pip install -e '.[test]')",
        allow_module_level=True,
    )

#: name: (file, the [H, W] the OCR pipeline feeds it, the least share of weight
#: elements each mode must change).  Absorb mode pins the neurons of non-equivariant
#: activations (HardSwish = x·HardSigmoid(x), Clip, Sigmoid): the recogniser has the
#: most (its SVTR neck); insert mode wraps them and frees nearly every neuron.
CASES = {
    "det": ("ch_PP-OCRv4_det_infer.onnx", [96, 128], {"absorb": 0.35, "insert": 0.95}),
    "cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", [48, 192], {"absorb": 0.9, "insert": 0.95}),
    "rec": ("ch_PP-OCRv4_rec_infer.onnx", [48, 320], {"absorb": 0.2, "insert": 0.95}),
}


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path``, as the working directory during the test."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def sigmoid_tail_only(report: dict) -> bool:
    """The verification failed only by relative error on an output whose absolute error
    is at float32 rounding (~1e-7): the Sigmoid tail, not a wrong teleport."""
    verification = report.get("verification") or {}
    outputs = verification.get("outputs") or []
    failed = [o for o in outputs if not o["passed"]]
    return bool(failed) and all(
        o["max_abs_err"] is not None and o["max_abs_err"] < 1e-6 for o in failed
    )


@pytest.mark.parametrize("mode", ["absorb", "insert"])
@pytest.mark.parametrize("name", list(CASES))
def test_ocr_model_teleports_with_default_options(
    work: Path, capsys: pytest.CaptureFixture[str], name: str, mode: str
) -> None:
    file, size, share = CASES[name]
    assert MODELS is not None
    src = MODELS / file
    rc = main([str(src), "-o", "out.onnx", "--report", "r.json", "--mode", mode, "-q"])
    err = capsys.readouterr().err
    report = json.loads(Path("r.json").read_text())
    if rc == 1 and name == "det" and sigmoid_tail_only(report):
        pytest.xfail(
            "det's output is a Sigmoid of large negative logits (~1e-8 on random inputs): "
            "onnxruntime's float32 sigmoid is accurate to ~1e-7 absolute there, so the "
            f"relative check rejects a correct teleport ({err.strip()}); the verification's "
            "combined tolerance (issue 12, item 1) is being fixed concurrently"
        )
    assert rc == 0, err
    assert report["verification"]["passed"]
    assert report["elements_changed"] >= share[mode] * report["elements_total"]

    entry = report["input_shapes"]["x"]
    height, width = entry["shape"][2:]
    assert entry["shape"][:2] == [1, 3] and height == width and height in LADDER
    assert entry["axes"]["0"] == "batch axis: 1"
    assert entry["axes"]["2"].startswith(f"ladder: {height}")

    feeds = {"x": np.random.default_rng(1).standard_normal([2, 3, *size]).astype(np.float32)}
    (before,) = run_ort(onnx.load(src), feeds)
    (after,) = run_ort(onnx.load("out.onnx"), feeds)
    err_abs = float(np.max(np.abs(before.astype(np.float64) - after)))
    # the detector's probabilities: absolute error; the others: relative to the output's scale
    scale = 1.0 if name == "det" else float(np.max(np.abs(before)))
    assert err_abs <= 1e-5 * scale, (name, mode, err_abs, scale)
