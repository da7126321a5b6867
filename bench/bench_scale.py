#!/usr/bin/env python
"""Time and peak memory of graphteleport on a LLaMA-shaped external-data model against
``cp`` of the same files, without and with verification, in one run; and an independent
check that the output computes what the original does.

The model (``models.llama``: layers × hidden, float32/float16/bfloat16, weights in
``NAME.onnx.data``) is generated into ``--dir`` once and reused; it is not part of the
repository (32 layers at hidden 4096 in float16 is LLaMA-7B's 13.5 GB).  Each step runs
as its own process under ``/usr/bin/time`` (wall seconds, peak resident set):

1. ``cp`` of the two files;
2. ``graphteleport MODEL -o OUT --no-verify -q --report R`` (its phases from the report);
3. ``graphteleport MODEL -o OUT -q --report R``: the default verification (``--verify-by
   auto``: whole where it fits in memory, else by pieces), the output kept for step 4;
4. the independent check (``--check SRC OUT``, also its own process): both models run in
   onnxruntime on one fixed token input, each by pieces along its own chain (no scales,
   no analysis: :func:`graphteleport.pieces.verify_blocks` without the promise, so each
   block of the output is fed the output's own previous blocks), and the logits are
   compared here: ``max |a − b| / max |a|`` must be ≤ ``--check-rtol`` (1e-2);
5. ``cp`` again — the page cache then favours neither side — and the ratios are against
   the mean of the two copies.

With ``--cold`` every timed step starts with the source's two files dropped from the page
cache (``os.sync`` first, then ``POSIX_FADV_DONTNEED``): each step reads them from the
disk, so the ratios do not depend on what the step before left cached (``cp`` alone took
12–25 s between runs on this machine, as the source was more or less cached).

With ``--baseline DIR`` (another checkout, e.g. a worktree of main), step 2 is first run
by that checkout's graphteleport (its root the working directory) and the two outputs'
data files are compared as 16-bit words (how many differ, by how many ulps at most): an
A/B in the same run, CPU seconds (user + system) included.  With ``--baseline-verified``
the A/B is of step 3 instead (the baseline's verified run first; ``--verify-by`` for
both).

Outputs are deleted after each step.  Prints one markdown table row (bench/README.md) and,
with ``--json``, everything.

    python bench/bench_scale.py --layers 8 --hidden 4096 --dtype float16 --dir /work/bigmodels

Exit status 3 when a ratio exceeds ``--max-ratio`` / ``--max-verified-ratio`` or the
independent check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.llama import LlamaShape, make_llama  # noqa: E402


def model_path(folder: Path, shape: LlamaShape) -> Path:
    """The generated model, made on first use (its generation time printed)."""
    path = folder / f"llama-{shape.layers}x{shape.hidden}-{shape.dtype}.onnx"
    if not (path.exists() and path.with_name(path.name + ".data").exists()):
        t = time.perf_counter()
        make_llama(path, shape)
        print(f"generated {path} in {time.perf_counter() - t:.1f} s", flush=True)
    return path


def timed(cmd: list[str], cwd: Path | None = None) -> tuple[float, int, float, float]:
    """Run ``cmd`` under GNU time: (wall seconds, peak RSS in bytes, user CPU seconds,
    system CPU seconds); fails loudly."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        full = ["/usr/bin/time", "-f", "%e %M %U %S", "-o", out.name, *cmd]
        proc = subprocess.run(full, capture_output=True, text=True, cwd=cwd)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        wall, rss_kb, user, system = out.read().split()[-4:]
    return float(wall), int(rss_kb) * 1024, float(user), float(system)


def drop_cached(paths: tuple[Path, ...]) -> None:
    """Write back what is dirty (``os.sync``) and drop ``paths`` from the page cache
    (``POSIX_FADV_DONTNEED``): the next step reads them from the disk, whatever the step
    before it left cached (``--cold``)."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def copy_files(src: Path, out: Path) -> tuple[float, int, float, float]:
    """``cp`` of the model's two files: (wall, peak RSS, user, system) as :func:`timed`."""
    data = src.with_name(src.name + ".data")
    took = timed(["cp", str(src), str(data), str(out)])
    for f in (src.name, data.name):
        (out / f).unlink()
    return took


def teleport(
    src: Path,
    out: Path,
    verify: bool,
    keep: bool = False,
    tree: Path | None = None,
    verify_by: str = "auto",
) -> dict[str, object]:
    """One graphteleport run: wall, peak RSS, CPU, the report's phases (and verification,
    ``--verify-by verify_by``); ``tree``: the checkout whose graphteleport runs (its root
    as the working directory, output ``b.onnx``; None: this one's, ``t.onnx``)."""
    dst = out / ("b.onnx" if tree else "t.onnx")
    report = dst.with_suffix(".json")
    cmd = [sys.executable, "-m", "graphteleport", str(src), "-o", str(dst), "-q"]
    how = ["--verify-by", verify_by] if verify else ["--no-verify"]
    flags = [*how, "--report", str(report)]
    wall, rss, user, system = timed([*cmd, *flags], cwd=tree or ROOT)
    rep = json.loads(report.read_text())
    v = rep.get("verification") or {}
    record: dict[str, object] = {
        "seconds": wall, "rss": rss, "cpu": user + system, "user": user, "sys": system,
        "phases": rep["seconds"],
    }  # fmt: skip
    if verify:
        record["verification"] = {
            k: v.get(k) for k in ("passed", "method", "blocks", "max_rel_err", "fused")
        }
    report.unlink()
    if not keep:
        for f in (dst, dst.with_name(dst.name + ".data")):
            f.unlink()
    return record


def independent_check(src: Path, dst: Path, rtol: float, vocab: int) -> dict[str, object]:
    """Step 4 as its own process under ``/usr/bin/time``: its result and peak RSS."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as res:
        cmd = [sys.executable, __file__, "--check", str(src), str(dst), "--check-out", res.name]
        cmd += ["--vocab", str(vocab)]
        wall, rss, _, _ = timed([*cmd, "--check-rtol", str(rtol)])
        record: dict[str, object] = json.loads(Path(res.name).read_text())
    record.update(seconds=wall, rss=rss)
    return record


def check(src: Path, dst: Path, rtol: float, seq: int, vocab: int) -> dict[str, object]:
    """Both models' logits on token ids ``rng(0)``, each model by pieces on its own chain,
    compared: ``max |a − b| / max |a|`` (and the largest absolute difference)."""
    import numpy as np

    from graphteleport.pieces import verify_blocks
    from graphteleport.verify import open_proto

    feeds = {"ids": np.random.default_rng(0).integers(0, vocab, (1, seq), dtype=np.int64)}
    t = time.perf_counter()
    result = verify_blocks(str(src), str(dst), [feeds], None, open_proto)
    ref, got = (
        np.asarray(r[0], dtype=np.float64) for r in (result.reference[0], result.candidate[0])
    )
    diff = float(np.max(np.abs(ref - got)))
    rel = diff / float(np.max(np.abs(ref)))
    finite = bool(np.isfinite(ref).all() and np.isfinite(got).all())
    return {
        "blocks": result.blocks, "rel": rel, "max_abs": diff, "rtol": rtol,
        "passed": finite and rel <= rtol, "logits": list(ref.shape),
        "check_seconds": time.perf_counter() - t,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dir", type=Path, default=Path("/work/bigmodels"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--max-ratio", type=float)
    ap.add_argument("--max-verified-ratio", type=float)
    ap.add_argument("--no-verified", action="store_true", help="skip steps 3 and 4")
    ap.add_argument(
        "--baseline", type=Path, help="another checkout (a worktree of main): A/B of step 2"
    )
    ap.add_argument(
        "--baseline-verified", action="store_true",
        help="with --baseline: the A/B is of step 3 (the baseline's run first), not step 2",
    )  # fmt: skip
    ap.add_argument(
        "--cold", action="store_true",
        help="drop the source files from the page cache before each timed step",
    )  # fmt: skip
    ap.add_argument("--verify-by", default="auto", choices=["auto", "whole", "pieces"])
    ap.add_argument("--check", nargs=2, type=Path, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--check-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--check-rtol", type=float, default=1e-2)
    a = ap.parse_args(argv)
    shape = LlamaShape(layers=a.layers, hidden=a.hidden, dtype=a.dtype, vocab=a.vocab)
    if a.check:
        found = check(*a.check, a.check_rtol, shape.seq, a.vocab)
        a.check_out.write_text(json.dumps(found))
        return 0
    a.dir.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    src = model_path(a.dir, shape)
    size = src.stat().st_size + src.with_name(src.name + ".data").stat().st_size
    out = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=a.dir))
    sources = (src, src.with_name(src.name + ".data"))

    def ready() -> None:  # (before each timed step)
        if a.cold:
            drop_cached(sources)

    verified: dict[str, object] | None = None
    baseline: dict[str, object] | None = None
    baseline_verified: dict[str, object] | None = None
    checked: dict[str, object] | None = None
    try:
        ready()
        cp1 = copy_files(src, out)
        plain_ab = a.baseline is not None and not a.baseline_verified
        if plain_ab:
            ready()
            baseline = teleport(src, out, verify=False, keep=True, tree=a.baseline)
        ready()
        plain = teleport(src, out, verify=False, keep=plain_ab)
        if plain_ab:
            baseline["ulps"] = compare_words(out / "b.onnx.data", out / "t.onnx.data")
            for f in (*out.glob("b.onnx*"), *out.glob("t.onnx*")):
                f.unlink()
        if not a.no_verified:
            if a.baseline and a.baseline_verified:
                ready()
                baseline_verified = teleport(src, out, True, tree=a.baseline, verify_by=a.verify_by)
            ready()
            verified = teleport(src, out, verify=True, keep=True, verify_by=a.verify_by)
            checked = independent_check(src, out / "t.onnx", a.check_rtol, a.vocab)
            for f in out.glob("t.onnx*"):
                f.unlink()
        ready()
        cp2 = copy_files(src, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    record = {
        "shape": shape.__dict__, "bytes": size, "cp": [cp1, cp2], "cp_mean": (cp1[0] + cp2[0]) / 2,
        "no_verify": plain, "verified": verified, "check": checked, "baseline": baseline,
        "baseline_verified": baseline_verified, "load": os.getloadavg(), "load_start": load_start,
        "cold": a.cold,
    }  # fmt: skip
    print_rows(record)
    print_cpu(record)
    if baseline is not None:
        n, b = plain, baseline
        print(
            f"baseline {a.baseline}: wall {b['seconds']:.1f} s, CPU {b['cpu']:.1f} s, "
            f"peak RSS {b['rss'] / 1e9:.2f} GB, rewrite {b['phases'].get('rewrite', 0):.1f} s; "
            f"this tree: wall {n['seconds']:.1f} s, CPU {n['cpu']:.1f} s, peak RSS "
            f"{n['rss'] / 1e9:.2f} GB, rewrite {n['phases'].get('rewrite', 0):.1f} s; "
            f"outputs: {b['ulps']}"
        )
    if baseline_verified is not None and verified is not None:
        print_verified_ab(a.baseline, baseline_verified, verified)
    if a.json:
        a.json.write_text(json.dumps(record, indent=2))
    return 3 if failed(record, a.max_ratio, a.max_verified_ratio) else 0


def print_rows(r: dict) -> None:  # type: ignore[type-arg]
    """The markdown table row of bench/README.md."""
    cp, plain, ver, chk = r["cp_mean"], r["no_verify"], r["verified"], r["check"]
    cp = max(cp, 1e-3)  # a tiny model copies in no measurable time
    ph = plain["phases"]
    cells = [
        f"{r['shape']['layers']}", f"{r['bytes'] / 1e9:.2f} GB", f"{cp:.1f} s",
        f"{plain['seconds']:.1f} s ({plain['seconds'] / cp:.2f}×)", f"{plain['rss'] / 1e9:.2f} GB",
        f"{ph.get('analyze', 0):.1f} / {ph.get('rewrite', 0):.1f} / {ph.get('save', 0):.1f} s",
    ]  # fmt: skip
    if ver is not None and chk is not None:
        v = ver["verification"]
        cells += [
            f"{ver['seconds']:.1f} s ({ver['seconds'] / cp:.2f}×)", f"{ver['rss'] / 1e9:.2f} GB",
            f"{ver['phases'].get('verify', 0):.1f} s ({v['method']}, {v['blocks']} blocks, "
            f"{'passed' if v['passed'] else 'FAILED'})",
            f"{chk['rel']:.1e} ({'ok' if chk['passed'] else 'FAILED'}; {chk['rss'] / 1e9:.2f} GB, "
            f"{chk['seconds']:.0f} s)",
        ]  # fmt: skip
    print("| layers | files | cp | --no-verify | peak RSS | analyze / rewrite / save "
          "| verified | peak RSS | verify | independent check (logits rel) |")  # fmt: skip
    print("| " + " | ".join(cells) + " |")


def print_cpu(r: dict) -> None:  # type: ignore[type-arg]
    """Each step's CPU, user and system (``cp``'s too), and the load average."""
    steps = [(f"cp {k + 1}", c[0], c[2], c[3]) for k, c in enumerate(r["cp"])]
    for name in ("no_verify", "verified"):
        if r[name] is not None:
            steps.append((name, r[name]["seconds"], r[name]["user"], r[name]["sys"]))
    for name, wall, user, system in steps:
        print(f"{name}: wall {wall:.1f} s, CPU user {user:.1f} s, system {system:.1f} s")
    for when, key in (("start", "load_start"), ("end", "load")):
        loads = " / ".join(f"{x:.2f}" for x in r[key])
        print(f"load average (1, 5, 15 min) at the {when}: {loads}")
    cache = "the source dropped before each step (--cold)" if r["cold"] else "as left"
    print(f"page cache: {cache}")


def print_verified_ab(tree: Path, base: dict, this: dict) -> None:  # type: ignore[type-arg]
    """Step 3 of the baseline and of this tree, one line each."""
    for name, r in ((f"baseline {tree}", base), ("this tree", this)):
        v = r["verification"]
        print(
            f"verified, {name}: wall {r['seconds']:.1f} s, CPU {r['cpu']:.1f} s (user "
            f"{r['user']:.1f}, system {r['sys']:.1f}), peak RSS "
            f"{r['rss'] / 1e9:.2f} GB, verify {r['phases'].get('verify', 0):.1f} s "
            f"({v['method']}, {v['blocks']} blocks, {'passed' if v['passed'] else 'FAILED'}, "
            f"max rel err {v['max_rel_err']:.3g})"
        )


def compare_words(a: Path, b: Path) -> dict[str, int]:
    """Two outputs' data files as 16-bit words (the float16/bfloat16 weights; other
    tensors' bytes only need to be equal): how many differ, and by how many ulps at most
    (words ordered like the values they encode)."""
    import numpy as np

    x, y = (np.memmap(p, dtype=np.uint16, mode="r") for p in (a, b))
    if x.size != y.size:
        return {"words": int(x.size), "differ": -1, "max_ulps": -1}
    differ = worst = 0
    for i in range(0, x.size, 1 << 24):
        u, v = (z[i : i + (1 << 24)].astype(np.int64) for z in (x, y))
        u, v = (np.where(z & 0x8000, -(z & 0x7FFF), z) for z in (u, v))
        d = np.abs(u - v)
        differ, worst = differ + int(np.count_nonzero(d)), max(worst, int(d.max(initial=0)))
    return {"words": int(x.size), "differ": differ, "max_ulps": worst}


def failed(r: dict, max_ratio: float | None, max_verified: float | None) -> bool:  # type: ignore[type-arg]
    """Whether a ratio exceeds its limit or the independent check failed."""
    cp = r["cp_mean"]
    bad = max_ratio is not None and r["no_verify"]["seconds"] / cp > max_ratio
    if r["verified"] is not None:
        bad |= max_verified is not None and r["verified"]["seconds"] / cp > max_verified
        bad |= not r["check"]["passed"] or not r["verified"]["verification"]["passed"]
    return bool(bad)


if __name__ == "__main__":
    raise SystemExit(main())
