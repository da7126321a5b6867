"""End to end on architectures nobody on this team wrote: small Hugging Face ``transformers``
models built from configs (no download; see ``models/hf.py``), exported with torch's dynamo
exporter and teleported by the CLI in-process.

Every model must teleport with exit status 0, pass verification with a relative error of at most
1e-4, and explain each pin.  The vision CNNs must also move most of their weights; measured on
torch 2.13 / transformers 5.24 / onnxscript 0.7 (absorb mode, seed 0):

    model               free cofactors   weight elements changed
    resnet_basic             224             100.0%
    resnet_bottleneck        176              99.9%
    regnet_x                 352             100.0%
    regnet_y                 168              99.2%  (squeeze-excite Sigmoid pins 48)
    convnext                 336              88.7%  (GELU pins the MLP's hidden neurons)
    convnext_relu            784              89.4%
    mobilenet_v2             256              89.2%  (ReLU6 = Clip pins 6496)

Library bugs these models found have regression tests below, with minimal reproductions in
their docstrings.

Exports are cached per session (one temp dir); the whole file takes about 1.5 minutes on two
cores.  timm and torchvision are not tested: they cannot be installed on the CPU-only machines
(timm needs torchvision, whose wheels need a ~5.5 GB CUDA build of torch).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import onnx_ir as ir  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # models/ is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from graphteleport.cli import main  # noqa: E402
from graphteleport.frontends.onnx import ort_probe, resolve_input_shapes  # noqa: E402
from graphteleport.passes.teleport import TeleportPass  # noqa: E402
from models.hf import HF_MODELS, export_entry, export_hf  # noqa: E402

pytestmark = pytest.mark.slow

MAX_REL_ERR = 1e-4

# (minimum free cofactors, minimum fraction of weight elements changed): about 3/4 of what was
# measured (module docstring), so heuristics may move a little without breaking the test.
VISION_CNN_FLOORS: dict[str, tuple[int, float]] = {
    "resnet_basic": (160, 0.9),
    "resnet_bottleneck": (128, 0.9),
    "regnet_x": (256, 0.9),
    "regnet_y": (120, 0.9),
    "convnext": (240, 0.75),
    "convnext_relu": (560, 0.75),
    "mobilenet_v2": (160, 0.75),
}


# -- cached export and teleport --------------------------------------------------------------
@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf_models")


_RUNS: dict[tuple[str, ...], tuple[int, dict[str, Any], Path, str]] = {}


def exported(hf_dir: Path, name: str) -> Path:
    path = hf_dir / f"{name}.onnx"
    if not path.exists():
        export_entry(name, path)
    return path


def teleport(src: Path, *extra: str) -> tuple[int, dict[str, Any], Path, str]:
    """Run ``graphteleport SRC -o OUT --report REP *extra`` in-process (cached): the exit
    status, the report (empty if none was written), the output path and stderr."""
    key = (str(src), *extra)
    if key not in _RUNS:
        tag = "-".join(a.strip("-").replace("=", "_").replace(",", "x") for a in extra)
        out = src.with_name(f"{src.stem}.tp{'-' + tag if tag else ''}.onnx")
        rep = out.with_suffix(".json")
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            rc = main([str(src), "-o", str(out), "--report", str(rep), "-q", *extra])
        report = json.loads(rep.read_text()) if rep.exists() else {}
        _RUNS[key] = (rc, report, out, err.getvalue())
    return _RUNS[key]


def changed_fraction(report: dict[str, Any]) -> float:
    return report["elements_changed"] / max(report["elements_total"], 1)


def initializer_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in onnx.load(str(path)).graph.initializer}


# -- every model -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(HF_MODELS))
def test_exports_teleports_and_verifies(hf_dir: Path, name: str) -> None:
    rc, report, out, err = teleport(exported(hf_dir, name))
    assert rc == 0, f"{name}: exit {rc}: {err.strip()[-500:]}"
    assert out.exists()
    v = report["verification"]
    assert v["passed"], v
    assert v["max_rel_err"] <= MAX_REL_ERR, v
    assert report["free_cofactors"] > 0
    assert report["initializers_changed"] > 0
    assert report["elements_changed"] > 0
    pins = report["pinned"]
    assert pins, "at least the graph outputs are pinned"
    for pin in pins:
        assert isinstance(pin["reason"], str) and pin["reason"].strip(), pin
        assert pin["cofactors"] > 0, pin
    assert any(p["reason"] == "graph output" for p in pins)


@pytest.mark.parametrize("name", list(VISION_CNN_FLOORS))
def test_vision_cnns_move_most_weights(hf_dir: Path, name: str) -> None:
    rc, report, _, err = teleport(exported(hf_dir, name))
    assert rc == 0, err
    min_free, min_changed = VISION_CNN_FLOORS[name]
    assert report["free_cofactors"] >= min_free
    assert changed_fraction(report) >= min_changed


@pytest.mark.parametrize("name", ["resnet_basic", "vit"])
def test_insert_mode_and_exact(hf_dir: Path, name: str) -> None:
    """Insert mode frees at least what absorb mode does; --exact is bit-identical."""
    src = exported(hf_dir, name)
    _, absorb, _, _ = teleport(src)
    rc, insert, _, err = teleport(src, "--mode", "insert")
    assert rc == 0, err
    assert insert["verification"]["max_rel_err"] <= MAX_REL_ERR
    assert insert["free_cofactors"] >= absorb["free_cofactors"]
    rc, exact, _, err = teleport(src, "--exact", "--sampling", "inter_landscape")
    assert rc == 0, err
    assert exact["verification"]["exact"] and exact["verification"]["max_abs_err"] == 0.0


# -- dynamic shapes --------------------------------------------------------------------------
def _feeds(session: Any, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        shape = [
            batch if k == 0 else (seq if isinstance(d, str) else d) for k, d in enumerate(i.shape)
        ]
        if "int" in i.type:
            feeds[i.name] = rng.integers(0, 97, size=shape).astype(np.int64)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def dynamic_export(hf_dir: Path, name: str) -> tuple[Path, list[str]]:
    """*name* exported with dynamic batch (and sequence) axes, and the ``--input-shape``
    arguments that size them (batch 2; sequence 5)."""
    entry = HF_MODELS[name]
    model, inputs = entry.build(0)
    batch = torch.export.Dim("batch", min=1, max=8)
    if "pixel_values" in inputs:
        dims = {"pixel_values": {0: batch}}
        shape = ",".join(map(str, (2, *inputs["pixel_values"].shape[1:])))
        args = ["--input-shape", f"pixel_values={shape}"]
    else:
        seq = torch.export.Dim("seq", min=2, max=16)
        dims = {k: {0: batch, 1: seq} for k in inputs}
        args = [a for k in inputs for a in ("--input-shape", f"{k}=2,5")]
    inputs = {k: torch.cat([v, v]) for k, v in inputs.items()}
    path = hf_dir / f"{name}_dynamic.onnx"
    if not path.exists():
        export_hf(model, inputs, path, dynamic_shapes=dims)
    return path, args


def agrees_at_other_shapes(src: Path | str, out: Path | str) -> None:
    """The two models agree at three other (batch, sequence) sizes."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    original = ort.InferenceSession(str(src), opts)
    teleported = ort.InferenceSession(str(out), opts)
    for b, s in [(1, 8), (3, 3), (2, 16)]:
        feeds = _feeds(original, b, s, seed=10 * b + s)
        for x, y in zip(original.run(None, feeds), teleported.run(None, feeds), strict=True):
            assert np.abs(x - y).max() <= MAX_REL_ERR * np.abs(x).max(), (b, s)


@pytest.mark.parametrize("name", ["resnet_basic", "bert_classifier", "llama"])
def test_dynamic_batch_and_sequence(hf_dir: Path, name: str) -> None:
    """Exported with dynamic batch (and sequence) axes, teleported at one shape given by
    --input-shape, the teleported model must agree with the original at other shapes too."""
    src, args = dynamic_export(hf_dir, name)
    rc, report, out, err = teleport(src, *args)
    assert rc == 0, err
    assert report["free_cofactors"] > 0
    agrees_at_other_shapes(src, out)


@pytest.mark.parametrize("name", ["resnet_basic", "bert_classifier", "llama"])
def test_dynamic_axes_pass_without_shapes_is_the_clis(hf_dir: Path, name: str) -> None:
    """``TeleportPass`` from Python without ``input_shapes`` analyses a dynamic export as
    the CLI does (the analysis sizes the open axes with the CLI's resolver): the same free
    pairs and weights as with the shapes the CLI resolves; the result runs at other sizes."""
    src, _ = dynamic_export(hf_dir, name)
    plain, sized = ir.load(src), ir.load(src)
    shapes = resolve_input_shapes(sized, probe=ort_probe(src)).shapes
    without = TeleportPass(seed=4)(plain)
    with_shapes = TeleportPass(seed=4, input_shapes=shapes)(sized)
    assert without.free_cofactors == with_shapes.free_cofactors > 0
    for k, v in plain.graph.initializers.items():
        w = sized.graph.initializers[k]
        assert v.const_value is not None and w.const_value is not None
        np.testing.assert_array_equal(v.const_value.numpy(), w.const_value.numpy())
    out = hf_dir / f"{name}_dynamic_pass.onnx"
    ir.save(plain, out)
    agrees_at_other_shapes(src, out)


# -- library bugs found with these models --------------------------------------------------
@pytest.mark.parametrize("name", list(HF_MODELS))
def test_absorb_keeps_every_initializer_shape(hf_dir: Path, name: str) -> None:
    """Absorb mode changes weight values only.  Regression test for a bug these models hit: a
    1-D bias/scale broadcast over a [B, T, C] activation was written back with the activation's
    rank (BERT's query bias [32] -> [1, 1, 32]; ConvNeXt's layer scale, LLaMA's RMSNorm weight,
    ViT/Swin biases).  Minimal repro: x[1,6,8] -> MatMul W1 -> Add b1[8] -> Relu -> MatMul W2
    (tests/test_rules.py::test_bias_of_add_keeps_its_shape is the same bug)."""
    src = exported(hf_dir, name)
    rc, _, out, err = teleport(src)
    assert rc == 0, err
    before, after = initializer_shapes(src), initializer_shapes(out)
    changed = {k: (before[k], after[k]) for k in before if k in after and before[k] != after[k]}
    assert not changed


def test_shared_layer_bias_is_not_pinned(hf_dir: Path) -> None:
    """ALBERT applies one layer's weights at every depth.  Regression test for a missed
    symmetry: a Linear applied twice pinned its whole output as 'weight <bias> is shared and
    broadcast' although its 1-D bias is only broadcast along the token axis (ALBERT moved 2.7%
    of its weight elements; 23% once fixed).  Minimal repro: x[6,8] -> MatMul W0 -> (MatMul W
    -> Add b) twice -> MatMul W2 had 0 free cofactors with the bias and 8 without it."""
    rc, report, _, err = teleport(exported(hf_dir, "albert"))
    assert rc == 0, err
    shared = [p["reason"] for p in report["pinned"] if "shared and broadcast" in p["reason"]]
    assert not [r for r in shared if ".bias " in r], shared
    assert changed_fraction(report) >= 0.15


def test_decomposed_layernorm_weights_keep_their_size(hf_dir: Path) -> None:
    """ViT exported by the legacy exporter at opset 14 writes LayerNorm out as
    ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add.  Regression test for a bug it hit: after the Concat
    that prepends the [CLS] token along the sequence axis, every sequence position became its
    own neuron and each LayerNorm weight/bias [32] was expanded to [1, 17, 32], so the
    teleported model only ran at the analysed sequence length.  Minimal repro: x[1,T,8] ->
    MatMul W1 -> Concat([cls[1,1,8], h], axis=1) -> Mul gamma[8] -> MatMul W2, teleported with
    --input-shape x=1,6,8 (gamma became [1, 7, 8]; the same with Concat([x@W1, x@W3]))."""
    path = hf_dir / "vit_legacy_opset14.onnx"
    if not path.exists():
        model, inputs = HF_MODELS["vit"].build(0)
        export_hf(model, inputs, path, exporter="legacy", opset=14)
    rc, report, out, err = teleport(path)
    assert rc == 0, err
    assert report["verification"]["max_rel_err"] <= MAX_REL_ERR
    before, after = initializer_shapes(path), initializer_shapes(out)
    grown = {
        k: (before[k], after[k])
        for k in before
        if k in after and int(np.prod(after[k])) > int(np.prod(before[k]))
    }
    assert not grown


def test_albert_legacy_export_teleports(hf_dir: Path) -> None:
    """Regression: a weight used directly by one node and through Identity/Transpose by
    another (the legacy exporter feeds ALBERT's shared layer weights through Identity)
    once crashed the rewrite (an assignment into a read-only broadcast view)."""
    path = hf_dir / "albert_legacy.onnx"
    if not path.exists():
        model, inputs = HF_MODELS["albert"].build(0)
        export_hf(model, inputs, path, exporter="legacy")
    rc, report, _, err = teleport(path)
    assert rc == 0, err
    assert report["verification"]["max_rel_err"] <= MAX_REL_ERR


# -- transformers in both modes (issue 3) ------------------------------------------------------
TRANSFORMERS = ["bert", "distilbert", "gpt2", "llama", "vit", "swin", "convnext"]


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformers_absorb_and_insert(hf_dir: Path, name: str) -> None:
    """Each transformer teleports in absorb and in insert mode (inter_landscape, r = 0.9)
    with verification at 1e-4; insert mode moves ≥ 80 % of the weight elements; whatever
    stays pinned is listed by reason."""
    src = exported(hf_dir, name)
    rc, absorb, _, err = teleport(src)
    assert rc == 0, err
    assert absorb["verification"]["passed"] and absorb["verification"]["max_rel_err"] <= 1e-4
    rc, insert, _, err = teleport(
        src, "--mode", "insert", "--sampling", "inter_landscape", "--cob-range", "0.9"
    )
    assert rc == 0, err
    assert insert["verification"]["passed"] and insert["verification"]["max_rel_err"] <= 1e-4
    assert changed_fraction(insert) >= 0.80, changed_fraction(insert)
    assert insert["free_cofactors"] > absorb["free_cofactors"]
    for report in (absorb, insert):
        assert all(p["reason"].strip() and p["cofactors"] > 0 for p in report["pinned"])
