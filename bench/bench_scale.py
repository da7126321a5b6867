#!/usr/bin/env python
"""Time and peak memory of ``graphteleport --no-verify`` on a LLaMA-shaped external-data
model against ``cp`` of the same files, in one run.

The model (``models.llama``: layers × hidden, float32/float16/bfloat16, weights in
``NAME.onnx.data``) is generated into ``--dir`` once and reused; it is not part of the
repository (32 layers at hidden 4096 in float16 is LLaMA-7B's 13.5 GB).  Each side runs
as its own process under ``/usr/bin/time`` (wall seconds, peak resident set): ``cp``
first, then graphteleport (with ``--report``, for its phases), then ``cp`` again — the
page cache then favours neither — and the outputs are deleted after each.  Prints one
markdown table row (bench/README.md) and, with ``--json``, everything.

    python bench/bench_scale.py --layers 8 --hidden 4096 --dtype float16 --dir /work/bigmodels

Exit status 3 when the ratio to ``cp`` exceeds ``--max-ratio``.
"""

from __future__ import annotations

import argparse
import json
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


def timed(cmd: list[str]) -> tuple[float, int]:
    """Run ``cmd`` under GNU time: (wall seconds, peak RSS in bytes); fails loudly."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        full = ["/usr/bin/time", "-f", "%e %M", "-o", out.name, *cmd]
        proc = subprocess.run(full, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        wall, rss_kb = out.read().split()[-2:]
    return float(wall), int(rss_kb) * 1024


def copy_files(src: Path, out: Path) -> tuple[float, int]:
    data = src.with_name(src.name + ".data")
    result = timed(["cp", str(src), str(data), str(out)])
    for f in (src.name, data.name):
        (out / f).unlink()
    return result


def teleport(src: Path, out: Path) -> tuple[float, int, dict[str, float]]:
    dst, report = out / "t.onnx", out / "t.json"
    cmd = [sys.executable, "-m", "graphteleport", str(src), "-o", str(dst), "--no-verify", "-q"]
    wall, rss = timed([*cmd, "--report", str(report)])
    seconds = json.loads(report.read_text())["seconds"]
    for f in (dst, dst.with_name(dst.name + ".data"), report):
        f.unlink()
    return wall, rss, seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dir", type=Path, default=Path("/work/bigmodels"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--max-ratio", type=float)
    a = ap.parse_args(argv)
    shape = LlamaShape(layers=a.layers, hidden=a.hidden, dtype=a.dtype, vocab=a.vocab)
    a.dir.mkdir(parents=True, exist_ok=True)
    src = model_path(a.dir, shape)
    size = src.stat().st_size + src.with_name(src.name + ".data").stat().st_size
    out = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=a.dir))
    try:
        cp1 = copy_files(src, out)
        wall, rss, seconds = teleport(src, out)
        cp2 = copy_files(src, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    cp_wall = (cp1[0] + cp2[0]) / 2
    ratio = wall / cp_wall
    row = (
        f"| {a.layers} | {a.hidden} | {a.dtype} | {size / 1e9:.2f} GB | {cp_wall:.1f} s "
        f"| {wall:.1f} s | {ratio:.1f}× | {rss / 2**30:.2f} GiB "
        f"| {seconds.get('analyze', 0):.2f} s | {seconds.get('rewrite', 0):.1f} s "
        f"| {seconds.get('save', 0):.1f} s |"
    )
    print("| layers | hidden | dtype | files | cp | graphteleport --no-verify | ratio "
          "| peak RSS | analyze | rewrite | save |")  # fmt: skip
    print(row)
    if a.json:
        record = {
            "shape": shape.__dict__, "bytes": size, "cp": [cp1, cp2],
            "teleport": {"seconds": wall, "rss": rss, "phases": seconds}, "ratio": ratio,
        }  # fmt: skip
        a.json.write_text(json.dumps(record, indent=2))
    return 3 if a.max_ratio is not None and ratio > a.max_ratio else 0


if __name__ == "__main__":
    raise SystemExit(main())
