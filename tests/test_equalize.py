"""EqualizePass and ``graphteleport equalize``: the FP32 function is unchanged (bit-identical
with --exact) in both modes; equalize(teleport(M)) = equalize(M); the balance reaches its
minimum and is DFQ's per-channel balance on two layers; an imbalanced channel is evened
out; the CLI's exit codes, atomic writes and report."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import (
    FIXTURE_NAMES,
    ExportCache,
    gemm_mlp,
    max_rel_err,
    random_feeds,
    run_ort,
    weights,
)
from test_canonical import assert_same_weights

from graphteleport.cli import main
from graphteleport.passes.equalize import (
    EqualizePass,
    EqualizeResult,
    balance_terms,
    power_of_two,
)
from graphteleport.passes.teleport import TeleportPass
from graphteleport.pipeline import TeleportOptions, equalize_file

REL = 1e-5
SEEDS = range(10)
#: Registry architectures (models.architectures.ARCHITECTURES) the invariance runs on.
REGISTRY = (
    "mlp",
    "residual_mlp",
    "vgg11_bn",
    "resnet18",
    "densenet",
    "unet",
    "mobilenetv2",
    "cnn1d",
    "cnn2d",
    "cnn3d",
    "transformer_mlp",
)


def _fixture(name: str) -> Callable[[ExportCache], onnx.ModelProto]:
    from models import FIXTURES_DIR

    return lambda _exported: onnx.load(FIXTURES_DIR / f"{name}.onnx")


def _arch(name: str, fold_bn: bool = True) -> Callable[[ExportCache], onnx.ModelProto]:
    return lambda exported: onnx.load(exported(name, fold_bn=fold_bn))


MODELS: dict[str, Callable[[ExportCache], onnx.ModelProto]] = {
    **{n: _fixture(n) for n in FIXTURE_NAMES},
    "gemm_mlp": lambda _e: gemm_mlp([5, 7, 6, 3]),
    **{n: _arch(n) for n in REGISTRY},
    "vgg11_bn-keep": _arch("vgg11_bn", fold_bn=False),
}


def equalized(proto: onnx.ModelProto, **kwargs: object) -> tuple[ir.Model, EqualizeResult]:
    model = ir.from_proto(proto)
    return model, EqualizePass(**kwargs)(model)  # type: ignore[arg-type]


@pytest.fixture(params=list(MODELS), scope="module")
def model_proto(request: pytest.FixtureRequest, exported: ExportCache) -> onnx.ModelProto:
    return MODELS[request.param](exported)


# -- Done-when 1: the function is unchanged ------------------------------------------------------
@pytest.mark.parametrize("mode", ["absorb", "insert"])
def test_function_unchanged(model_proto: onnx.ModelProto, mode: str) -> None:
    feeds = random_feeds(model_proto)
    model, result = equalized(model_proto, mode=mode)
    assert result.figures is not None and result.figures.moved > 0
    assert max_rel_err(model_proto, ir.to_proto(model), feeds) < 1e-4


@pytest.mark.parametrize("mode", ["absorb", "insert"])
def test_exact_is_bit_identical(model_proto: onnx.ModelProto, mode: str) -> None:
    feeds = random_feeds(model_proto)
    model, result = equalized(model_proto, mode=mode, exact=True)
    free = result.pair_values[result.analysis.solution.free]
    assert np.all(power_of_two(free) == free)  # powers of two
    assert result.figures is not None and result.figures.moved > 0  # and something moved
    for x, y in zip(run_ort(model_proto, feeds), run_ort(ir.to_proto(model), feeds), strict=True):
        assert np.array_equal(x, y)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("mode", ["absorb", "insert"])
@pytest.mark.parametrize("exact", [False, True])
def test_pipeline_verifies(name: str, mode: str, exact: bool, tmp_path: Path) -> None:
    from models import FIXTURES_DIR

    report = equalize_file(
        FIXTURES_DIR / f"{name}.onnx", tmp_path / "eq.onnx", TeleportOptions(mode=mode, exact=exact)
    )
    v = report.verification
    assert v is not None and v.passed and v.tensors is not None  # per tensor too
    if exact:
        assert v.exact and v.max_abs_err == 0.0
    assert (tmp_path / "eq.onnx").exists()


# -- Done-when 4: equalize(teleport(M)) = equalize(M) ---------------------------------------------
def test_teleports_share_the_equalized_form(model_proto: onnx.ModelProto) -> None:
    reference, result = equalized(model_proto)
    assert result.minimum is not None and result.minimum.iterations > 0
    feeds = random_feeds(model_proto)
    for seed in SEEDS:
        moved = ir.from_proto(model_proto)
        TeleportPass(seed=seed, cob_range=0.9)(moved)
        assert max_rel_err(model_proto, moved, feeds) < 1e-4
        with pytest.raises(AssertionError):  # the teleport did move the weights
            assert_same_weights(ir.from_proto(model_proto), moved, REL)
        again, _ = equalized(ir.to_proto(moved))
        assert_same_weights(reference, again, REL)


def test_idempotent(model_proto: onnx.ModelProto) -> None:
    once, _ = equalized(model_proto)
    twice, second = equalized(ir.to_proto(once))
    assert_same_weights(once, twice, 1e-6)
    assert second.minimum is not None
    assert second.minimum.objective_after == pytest.approx(second.minimum.objective_before, 1e-6)


# -- the objective ---------------------------------------------------------------------------------
def test_gradient_vanishes_at_the_minimum() -> None:
    from models import FIXTURES_DIR

    proto = onnx.load(FIXTURES_DIR / "resnet_tiny.onnx")
    _, result = equalized(proto, p=6.0)
    terms = balance_terms(result.analysis, 6.0, arrays=weights(proto))  # the original's
    u = np.log(result.pair_values)
    assert np.abs(terms.gradient(u)).max() <= 1e-10 * terms.objective(u)
    assert terms.objective(u) < terms.objective(np.zeros_like(u))


@pytest.mark.parametrize("p", [2.0, 4.0, 8.0])
def test_two_layers_balance_power_means_per_channel(p: float) -> None:
    """One hidden layer, no bias: B_p is separable and its minimum gives row i of W1 and
    column i of W2 equal p-th power means (DFQ's balance with ranges as power means)."""
    proto = gemm_mlp([6, 9, 4], bias=False)
    model, _ = equalized(proto, p=p)
    w = [x for x in weights(model).values() if x.ndim == 2]
    w1, w2 = (x.astype(np.float64) for x in w)  # Gemm: [in, out]
    assert w1.shape == (6, 9) and w2.shape == (9, 4)
    into = np.mean(np.abs(w1) ** p, axis=0) ** (1 / p)  # per hidden channel
    out_of = np.mean(np.abs(w2) ** p, axis=1) ** (1 / p)
    np.testing.assert_allclose(into, out_of, rtol=1e-5)
    before = [x.astype(np.float64) for x in weights(proto).values() if x.ndim == 2]
    assert not np.allclose(before[0].std(axis=0), before[1].std(axis=1), rtol=1e-2)


@pytest.mark.parametrize("exact", [False, True])
def test_scaled_channel_is_evened_out(exact: bool) -> None:
    """A hidden channel scaled x100 (W1's row, the next W2's column /100: the same
    function) makes W1's ranges uneven; equalizing brings max/mean back down and raises
    W1's predicted INT8 SQNR — with --exact too (powers of two: within √2 of the optimum)."""
    proto = gemm_mlp([8, 16, 16, 4], bias=False)
    w = {i.name: onnx.numpy_helper.to_array(i).copy() for i in proto.graph.initializer}
    names = [n for n, x in w.items() if x.ndim == 2]
    w[names[0]][:, 3] *= 100.0  # [in, out]
    w[names[1]][3] /= 100.0
    for init in proto.graph.initializer:
        init.CopyFrom(onnx.numpy_helper.from_array(w[init.name], init.name))

    def imbalance(m: onnx.ModelProto | ir.Model) -> float:
        r = np.abs(weights(m)[names[0]]).max(axis=0)  # per hidden channel (Gemm: [in, out])
        return float(r.max() / r.mean())

    model, result = equalized(proto, exact=exact)
    assert imbalance(proto) > 10.0
    assert imbalance(model) < (2.0 * np.sqrt(2.0) if exact else 2.0)
    assert result.figures is not None
    first = next(t for t in result.figures.tensors if t.name == names[0])
    assert first.sqnr_db(after=True) > first.sqnr_db(after=False) + 5.0
    assert max_rel_err(proto, ir.to_proto(model)) < 1e-4


def test_figures_count_only_quantized_weights() -> None:
    proto = gemm_mlp([5, 7, 3], bias=True)
    _, result = equalized(proto)
    assert result.figures is not None
    names = {t.name for t in result.figures.tensors}
    assert names == {i.name for i in proto.graph.initializer if len(i.dims) == 2}
    assert result.figures.fraction_moved == 1.0
    assert all(len(c.tensors) == 2 for c in result.figures.classes)  # W1 row, W2 column


def test_class_entries_are_made_when_read() -> None:
    """The pass leaves the report's class entries as arrays (``class_table``); the
    :class:`ClassRange` tuples are made on the first read of ``classes``, once, and are
    what the table holds: one per moved class, its cofactor the pass's value."""
    _, result = equalized(gemm_mlp([5, 7, 6, 3]))
    figures = result.figures
    assert figures is not None
    assert "classes" not in vars(figures)  # (not made by the pass)
    classes = figures.classes
    assert classes is figures.classes and classes == figures.class_table.entries()
    pairs = [c.pair for c in classes]
    assert pairs == sorted(set(pairs)) and len(pairs) > 0
    assert all(c.cofactor == result.pair_values[c.pair] for c in classes)
    assert figures.to_json()["classes"] == [c.to_json() for c in classes]


# -- the CLI ---------------------------------------------------------------------------------------
def cli(*argv: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's usage errors
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def test_cli_writes_model_and_report(fixtures_dir: Path, tmp_path: Path) -> None:
    out, rep = tmp_path / "eq.onnx", tmp_path / "r.json"
    code, stdout, stderr = cli(
        "equalize", fixtures_dir / "resnet_tiny.onnx", "-o", out, "--report", rep, "--exact"
    )
    assert code == 0, stderr
    assert "equalize" in stdout and "bit-exact" in stdout
    report = json.loads(rep.read_text())
    assert report["verification"]["passed"] and report["verification"]["exact"]
    e = report["equalize"]
    keys = ("method", "p", "objective_before", "objective_after", "fraction_moved",
            "predicted_noise_before", "predicted_noise_after", "tensors", "classes")  # fmt: skip
    for key in keys:
        assert key in e, key
    assert e["method"] == "cle" and e["objective_after"] < e["objective_before"]
    t = e["tensors"][0]
    assert t["step_before"] == pytest.approx(t["range_before"] / 127)
    assert e["classes"] and len(e["classes"][0]["ranges"][0]) == 3
    assert "sampling" not in report and "seed" not in report
    assert report["written"] == [str(out)]


def test_cli_quiet(fixtures_dir: Path, tmp_path: Path) -> None:
    code, stdout, stderr = cli(
        "equalize", fixtures_dir / "mlp_small.onnx", "-o", tmp_path / "q.onnx", "-q"
    )
    assert (code, stdout, stderr) == (0, "", "")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--p", "1"], "--p must be above 1"),
        (["--p", "nan"], "--p must be above 1"),
        (["--alpha", "2"], "--alpha"),
        (["--method", "smooth"], "--calibration"),
        (["--method", "nope"], "invalid choice"),
        (["--rtol", "0"], "--rtol"),
    ],
)
def test_cli_bad_options(fixtures_dir: Path, tmp_path: Path, extra: list[str], needle: str) -> None:
    out = tmp_path / "o.onnx"
    code, _, stderr = cli("equalize", fixtures_dir / "mlp_small.onnx", "-o", out, *extra)
    assert code == 2 and needle in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_bad_files(fixtures_dir: Path, tmp_path: Path) -> None:
    src = fixtures_dir / "mlp_small.onnx"
    cases = [
        ("equalize", tmp_path / "missing.onnx", "-o", tmp_path / "o.onnx"),
        ("equalize", src, "-o", src),  # would overwrite the input
        ("equalize", src, "-o", tmp_path / "o.onnx", "--report", tmp_path / "no" / "r.json"),
    ]
    notnpz = tmp_path / "feeds.npz"
    notnpz.write_text("not an archive")
    cases.append(
        ("equalize", src, "-o", tmp_path / "o.onnx", "--method", "smooth", "--calibration", notnpz)
    )
    cases.append(("equalize", src, "-o", notnpz, "--method", "smooth", "--calibration", notnpz))
    for argv in cases:
        code, _, stderr = cli(*argv)
        assert code == 2, (argv, stderr)
        assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
        assert not (tmp_path / "o.onnx").exists()
    assert notnpz.read_text() == "not an archive"


def test_cli_smooth(fixtures_dir: Path, tmp_path: Path) -> None:
    proto = onnx.load(fixtures_dir / "resnet_tiny.onnx")
    samples = [random_feeds(proto, seed=k) for k in range(3)]
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, **{n: np.stack([s[n] for s in samples]) for n in samples[0]})
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code, _, stderr = cli(
        "equalize", fixtures_dir / "resnet_tiny.onnx", "-o", out, "--report", rep,
        "--method", "smooth", "--calibration", feeds, "--alpha", "0.5",
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads(rep.read_text())
    assert report["verification"]["passed"]
    assert report["equalize"]["method"] == "smooth" and report["equalize"]["alpha"] == 0.5
    assert report["equalize"]["weight_elements_moved"] > 0
    assert feeds.exists()


# -- torch ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mlp", "resnet18", "transformer_mlp"])
@pytest.mark.parametrize("exact", [False, True])
def test_torch_equalize_in_place(arch: str, exact: bool) -> None:
    torch = pytest.importorskip("torch")
    from graphteleport.torch import equalize
    from models.architectures import ARCHITECTURES

    model, shape = ARCHITECTURES[arch]()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    result = equalize(model, x, exact=exact)
    with torch.no_grad():
        after = model(x)
    assert result.free_cofactors > 0
    assert any(not torch.equal(params[k], v) for k, v in model.named_parameters())
    if exact:
        assert torch.equal(before, after)
    else:
        assert float((after - before).abs().max()) <= 1e-5 * float(before.abs().max())
    again = {k: v.detach().clone() for k, v in model.named_parameters()}
    equalize(model, x)  # at the minimum already (exact: within a factor √2 of it)
    for k, v in model.named_parameters():
        tol = 0.5 if exact else 1e-5
        assert torch.allclose(v, again[k], rtol=tol, atol=tol * float(again[k].abs().max())), k


def test_torch_equalize_refuses_smooth() -> None:
    torch = pytest.importorskip("torch")
    from graphteleport.errors import InputError
    from graphteleport.torch import equalize

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(InputError, match="cle"):
        equalize(model, torch.randn(1, 3), method="smooth")
    with pytest.raises(InputError, match="--p"):
        equalize(model, torch.randn(1, 3), p=1.0)


# -- the report's figures against the weights --------------------------------------------------
def _figures_by_brute_force(
    proto: onnx.ModelProto, result: EqualizeResult
) -> tuple[list[tuple[str, int, int, float, float, float, float]], dict[tuple[int, int], tuple]]:
    """Every figure from the definitions, element by element: per quantized tensor (name,
    elements, moved, max|W| before and after, Σ W² before and after) with ``S`` broadcast
    to the whole tensor, and per (pair, tensor) the largest |W| before and after over the
    elements each of its factors' ids scales."""
    from graphteleport.algebra import scale, with_rank
    from graphteleport.orbit import counted_uses, used_values
    from graphteleport.passes.equalize import quantized_analysis

    before = weights(proto)
    analysis, tau, values = result.analysis, result.tau, result.pair_values
    moved_pairs = analysis.solution.free & (values != 1.0)
    tensors = []
    classes: dict[tuple[int, int], tuple[float, float]] = {}
    for k, use in enumerate(counted_uses(quantized_analysis(analysis))):
        w = used_values(use, before[use.source.name])
        s = np.abs(np.broadcast_to(scale(use, tau), w.shape))
        a = np.abs(w.astype(np.float64))
        rounded = s.astype(w.dtype if w.dtype.itemsize <= 4 else np.float64)
        moved = int(np.count_nonzero((w != 0) & (rounded != 1)))
        sq = float((a * a).sum())
        tensors.append(
            (
                use.source.name,
                w.size,
                moved,
                a.max(),
                (a * s).max(),
                sq,
                float((a * a * s * s).sum()),
            )
        )
        for f in use.factors:
            ids = np.broadcast_to(with_rank(np.asarray(f.ids), w.ndim), w.shape)
            pairs = analysis.solution.pair[ids]
            for q in np.unique(pairs[moved_pairs[pairs]]):
                at = pairs == q
                old = classes.get((int(q), k), (0.0, 0.0))
                classes[int(q), k] = (max(old[0], a[at].max()), max(old[1], (a * s)[at].max()))
    return tensors, classes


def _with_zeros(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with a row, a column and a few scattered elements of each 2-D weight 0."""
    for init in proto.graph.initializer:
        w = onnx.numpy_helper.to_array(init).copy()
        if w.ndim == 2:
            w[0] = 0.0
            w[:, -1] = 0.0
            w.flat[:: max(w.size // 5, 1)] = 0.0
            init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    return proto


@pytest.mark.parametrize("name", [*FIXTURE_NAMES, "gemm_mlp", "exact", "zeros"])
def test_figures_match_the_weights(name: str) -> None:
    """The report's per-tensor and per-class figures (gathered per compact element, from
    factored S) equal the definitions evaluated element by element: convs and Gemms, with
    powers of two (some S exactly 1), and with zeros (not counted as moved)."""
    if name in ("gemm_mlp", "exact", "zeros"):
        proto = gemm_mlp([5, 7, 6, 3])
        proto = _with_zeros(proto) if name == "zeros" else proto
    else:
        proto = _fixture(name)(None)  # type: ignore[arg-type]
    _, result = equalized(proto, exact=name == "exact")
    assert result.figures is not None
    tensors, classes = _figures_by_brute_force(proto, result)
    got = result.figures.tensors
    assert [(t.name, t.elements, t.moved) for t in got] == [t[:3] for t in tensors]
    for t, (*_, mb, ma, sb, sa) in zip(got, tensors, strict=True):
        assert t.max_before == mb  # the largest |W|: exact
        assert t.max_after == pytest.approx(ma, rel=3e-7)  # float32's rounding of W·S
        assert (t.sq_before, t.sq_after) == pytest.approx((sb, sa), rel=1e-6)
    found = {(c.pair, k): (b, a) for c in result.figures.classes for k, b, a in c.tensors}
    assert found.keys() == classes.keys()
    for key, (b, a) in classes.items():
        assert found[key][0] == b, key
        assert found[key][1] == pytest.approx(a, rel=3e-7), key
    assert {c.pair: c.cofactor for c in result.figures.classes} == {
        q: result.pair_values[q] for q, _ in classes
    }


def _post_ln_block(width: int = 6, hidden: int = 12, seed: int = 0) -> onnx.ModelProto:
    """A post-LN transformer MLP block (BERT's): ``h = LN(x)``, ``y = LN(h + W2·gelu(W1·h +
    b1) + b2)``.  In insert mode the Gelu is wrapped and the second LN's input scaled, so
    ``h``'s class and the hidden class moving together change neither MatMul weight, only
    LN₁'s scale and bias and the two biases — all the same way."""
    rng = np.random.default_rng(seed)
    h = onnx.helper

    def init(name: str, *shape: int, scale: float = 1.0) -> onnx.TensorProto:
        x = (scale * rng.standard_normal(shape)).astype(np.float32)
        return onnx.numpy_helper.from_array(x, name)

    inits = [
        init("g1", width), init("c1", width), init("w1", width, hidden), init("b1", hidden),
        init("w2", hidden, width), init("b2", width), init("g2", width), init("c2", width),
    ]  # fmt: skip
    nodes = [
        h.make_node("LayerNormalization", ["x", "g1", "c1"], ["h"], axis=-1),
        h.make_node("MatMul", ["h", "w1"], ["m1"]),
        h.make_node("Add", ["m1", "b1"], ["a1"]),
        h.make_node("Gelu", ["a1"], ["g"], domain=""),
        h.make_node("MatMul", ["g", "w2"], ["m2"]),
        h.make_node("Add", ["m2", "b2"], ["a2"]),
        h.make_node("Add", ["h", "a2"], ["r"]),
        h.make_node("LayerNormalization", ["r", "g2", "c2"], ["y"], axis=-1),
    ]
    f32 = onnx.TensorProto.FLOAT
    graph = h.make_graph(
        nodes, "post_ln", [h.make_tensor_value_info("x", f32, [2, 3, width])],
        [h.make_tensor_value_info("y", f32, [2, 3, width])], inits,
    )  # fmt: skip
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 20)], ir_version=10)


@pytest.mark.parametrize("seed", [0, 1])
def test_insert_mode_counts_inserted_nodes(seed: int) -> None:
    """Insert mode on a post-LN block (:func:`_post_ln_block`) converges to a finite
    minimum: the inserted ``Mul`` constants count in ``B_p`` like the biases, else the
    direction that moves only the non-quantized tensors lets ``B_p`` fall without bound
    (MiniLM, and seed 1 here: no convergence in 200 Newton steps; seed 0: |u| 5.4)."""
    proto = _post_ln_block(seed=seed)
    model, result = equalized(proto, mode="insert")
    assert result.minimum is not None and result.minimum.gradient <= 1e-8  # (last step unread)
    assert result.inserted.nodes_added > 0
    u = np.log(np.abs(result.pair_values))
    assert np.abs(u).max() < 3.0  # unbounded: |u| grows ~1/p per Newton step
    assert max_rel_err(proto, ir.to_proto(model)) < 1e-4


@pytest.mark.parametrize("name", ["resnet_tiny", "big"])
def test_figures_gathered_by_the_rewrite(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The figures the rewrite gathers as it multiplies (``FiguresObserver``) equal those
    :func:`figures_of` computes from the weights again: every count and maximum exactly,
    the sums of squares to float32's summation; also where the rewrite cuts a weight over
    two threads (``big``: a 1100 × 1024 Gemm weight, its row ranges' figures merged)."""
    from graphteleport import parallel
    from graphteleport.passes import equalize as eq

    monkeypatch.setattr(parallel, "workers", lambda: 2)
    proto = gemm_mlp([8, 1100, 1024, 4]) if name == "big" else _fixture(name)(None)  # type: ignore[arg-type]
    seen: list[int] = []
    gather = eq.FiguresObserver.seen

    def spy(self: eq.FiguresObserver) -> dict[str, tuple[object, eq.UseFigures]]:
        out = gather(self)
        seen.append(len(out))
        return out  # type: ignore[return-value]

    monkeypatch.setattr(eq.FiguresObserver, "seen", spy)
    _, fused = equalized(proto)
    monkeypatch.setattr(eq.FiguresObserver, "__call__", lambda *_: None)
    _, plain = equalized(proto)
    assert seen[0] > 0 and seen[1] == 0  # the rewrite gathered some; then none
    a, b = fused.figures, plain.figures
    assert a is not None and b is not None
    for x, y in zip(a.tensors, b.tensors, strict=True):
        assert (x.name, x.elements, x.moved) == (y.name, y.elements, y.moved)
        assert (x.max_before, x.max_after) == (y.max_before, y.max_after)
        assert (x.sq_before, x.sq_after) == pytest.approx((y.sq_before, y.sq_after), rel=1e-6)
    assert a.classes == b.classes
    assert fused.stats.elements_changed == plain.stats.elements_changed


def _tiny_mlp() -> onnx.ModelProto:
    """gemm_mlp([6, 9, 5, 3]) whose first weight holds a subnormal, a value near float32's
    smallest normal and a zero: counts that compare W and W', and a range fit."""
    proto = gemm_mlp([6, 9, 5, 3])
    for init in proto.graph.initializer:
        w = onnx.numpy_helper.to_array(init).copy()
        if w.ndim == 2:
            w[0, 0], w[1, 1], w[2, 2] = 1e-40, 2e-38, 0.0
            init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
            break
    return proto


def test_products_written_over_the_pass_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    """cle writes each watched weight's product over the pass's own copy of W
    (``stored_arrays(writable=True)``, ``consume``): the same weights, counts and figures
    as into fresh arrays, also where the count compares W and W' (a subnormal: W is read
    again from the model) — and some product really was written over its W."""
    from graphteleport import rewrite
    from graphteleport.passes import equalize as eq

    over: list[bool] = []
    product = rewrite._product_rows

    def spy(w: np.ndarray, *args: object, **kwargs: object) -> object:
        out = product(w, *args, **kwargs)  # type: ignore[arg-type]
        over.append(out[0] is w)
        return out

    monkeypatch.setattr(rewrite, "_product_rows", spy)
    plain = eq.stored_arrays
    for proto in (_tiny_mlp(), _fixture("resnet_tiny")(None)):  # type: ignore[arg-type]
        over.clear()
        a, fused = equalized(proto)
        assert any(over)
        monkeypatch.setattr(eq, "stored_arrays", lambda analysis, writable=False: plain(analysis))
        over.clear()
        b, fresh = equalized(proto)
        monkeypatch.setattr(eq, "stored_arrays", plain)
        assert not any(over)
        assert fused.stats == fresh.stats
        assert fused.figures is not None and fresh.figures is not None
        assert fused.figures.to_json() == fresh.figures.to_json()
        for name, v in a.graph.initializers.items():
            other = b.graph.initializers[name].const_value
            assert v.const_value is not None and other is not None
            assert np.array_equal(v.const_value.numpy(), other.numpy(), equal_nan=True), name


def test_a_second_prepare_reads_the_model() -> None:
    """With ``consume``, values the range fit moves after the first products are applied
    from the model's own tensors (the arrays hold the first products by then): the same
    rewrite as from read-only arrays."""
    from graphteleport.analysis import analyze_model
    from graphteleport.orbit import stored_arrays
    from graphteleport.passes.teleport import apply_values

    results = []
    for consume in (True, False):
        model = ir.from_proto(_tiny_mlp())
        analysis = analyze_model(model, {})
        values = np.where(analysis.solution.free, 1e-30, 1.0)  # W · 1e-30: out of range
        values[10:] = 1.0  # (the first hidden layer's only: S ≠ 1 on its weights)
        arrays = stored_arrays(analysis, writable=consume)
        tau, stats, _, fixes = apply_values(model, analysis, values, arrays=arrays, consume=consume)
        assert fixes  # the fit moved some values: a second prepare ran
        weights = {n: v.const_value.numpy() for n, v in model.graph.initializers.items()}  # type: ignore[union-attr]
        results.append((tau, stats, weights))
    (t1, s1, w1), (t2, s2, w2) = results
    assert np.array_equal(t1, t2) and s1 == s2
    assert all(np.array_equal(w1[n], w2[n]) for n in w1)


def test_figures_of_an_overwritten_weight_must_be_gathered() -> None:
    """A weight whose product was written over its array (``consume``) has no W left for
    ``use_figures``: if its watch did not see every row, ``seen`` refuses instead of
    letting the figures be computed from the product."""
    from graphteleport.analysis import analyze_model
    from graphteleport.orbit import compact_shape, stored_arrays
    from graphteleport.passes.equalize import FiguresObserver

    analysis = analyze_model(ir.from_proto(gemm_mlp([4, 6, 3])), {})
    weight = next(w for w in analysis.weights if len(w.uses[0].shape) == 2)
    w = stored_arrays(analysis)[weight.source.name]
    observer = FiguresObserver(analysis)
    watch = observer(weight, w, compact_shape(weight.uses[0]))
    assert watch is not None
    watch.begin(1)  # a product into a fresh array that showed no rows: left to use_figures
    assert observer.seen() == {}
    watch.begin(1, overwrite=True)  # ... written over W: refused
    with pytest.raises(RuntimeError, match="not gathered"):
        observer.seen()


def test_a_consumed_array_is_read_as_w_once_written_over() -> None:
    """Two weights reading one stored tensor (the same name: one array in ``arrays``): with
    ``consume`` the second product still multiplies W, read again from the model, not
    the first weight's product that was written over the array."""
    import dataclasses

    from graphteleport.analysis import analyze_model
    from graphteleport.orbit import stored_arrays
    from graphteleport.rewrite import prepare

    analysis = analyze_model(ir.from_proto(gemm_mlp([4, 6, 3])), {})
    first = next(w for w in analysis.weights if len(w.uses[0].shape) == 2)
    twice = dataclasses.replace(analysis, weights=(*analysis.weights, first))
    values = np.where(analysis.solution.free, 1.5, 1.0)
    tau = analysis.solution.cofactors(values)
    k = analysis.weights.index(first)
    expected = prepare(analysis, tau, stored_arrays(analysis)).pending[k]  # (fresh arrays)
    prepared = prepare(twice, tau, stored_arrays(analysis, writable=True), consume=True)
    a, b = prepared.pending[k], prepared.pending[-1]
    assert isinstance(expected.new, np.ndarray) and expected.changed > 0
    for p in (a, b):
        assert isinstance(p.new, np.ndarray) and p.changed == expected.changed
        assert np.array_equal(p.new, expected.new)


@pytest.mark.parametrize(
    ("cells", "window"), [((6, 5, 1, 1), 1), ((6, 5, 1, 1), 9), ((7,), 1), ((1, 4), 3)]
)
def test_square_sums_are_the_definitions_over_the_elements(
    cells: tuple[int, ...], window: int
) -> None:
    """``_square_sums`` from per-cell statistics (``Σ W²`` per cell, or none for a
    one-element cell) equals ``Σ W²`` and ``Σ (W·s)²`` summed element by element in
    float64, to float32's rounding of the products and the row sums."""
    from graphteleport.passes.equalize import _square_sums

    rng = np.random.default_rng(len(cells) * 10 + window)
    w = rng.standard_normal((*cells, window)).astype(np.float32)
    w.flat[::4] = 0.0
    s = (rng.random(cells) * 3 + 0.25).astype(np.float32)
    a = np.abs(w)
    peak = a.max(axis=-1)
    sq = None if window == 1 else (np.square(a) @ np.ones(window, np.float32))
    before, after = _square_sums(peak, sq, peak * s, s)
    w64, s64 = w.astype(np.float64), s.astype(np.float64)[..., None]
    assert before == pytest.approx(float(np.sum(w64**2)), rel=1e-6)
    assert after == pytest.approx(float(np.sum((w64 * s64) ** 2)), rel=1e-6)


@pytest.mark.parametrize("name", ["gemm_mlp", "resnet_tiny"])
def test_watched_figures_take_the_magnitude_of_a_negative_s(name: str) -> None:
    """The figures the rewrite's watch gathers (:class:`FiguresObserver`) equal
    :func:`use_figures`' (which takes ``|τ^exp|``) for positive cofactors and where some are
    negative — the watch skips its look for a negative ``S`` only where the rewrite says
    every factor's ``τ`` is positive."""
    from graphteleport.analysis import analyze_model
    from graphteleport.orbit import stored_arrays
    from graphteleport.passes.equalize import FiguresObserver, use_figures
    from graphteleport.rewrite import observed, prepare

    proto = gemm_mlp([6, 9, 5, 3]) if name == "gemm_mlp" else _fixture(name)(None)  # type: ignore[arg-type]
    model = ir.from_proto(proto)
    analysis = analyze_model(model, {})
    arrays = stored_arrays(analysis)
    rng = np.random.default_rng(3)
    for signs in (False, True):
        values = rng.uniform(0.4, 2.5, analysis.solution.free.size)
        if signs:
            values *= rng.choice([-1.0, 1.0], values.size)
        tau = analysis.solution.cofactors(values)
        observer = FiguresObserver(analysis)
        with observed(observer):
            prepare(analysis, tau, arrays)
        seen = observer.seen()
        assert seen
        negative = 0
        for tensor, (use, got) in seen.items():
            want = use_figures(use, arrays[tensor], tau)
            assert got.moved == want.moved, tensor
            assert got.peaks == pytest.approx(want.peaks, rel=3e-7), tensor
            assert got.squares == pytest.approx(want.squares, rel=1e-6), tensor
            for g, w in zip(got.before + got.after, want.before + want.after, strict=True):
                assert np.allclose(g, w, rtol=3e-7, atol=0), tensor
            negative += any(bool(np.any(tau[np.asarray(f.ids)] < 0)) for f in use.factors)
        assert (negative > 0) == signs
