"""One-shot check on a machine with CUDA (and, where installed, torchvision/timm).

Not collected by pytest (no ``test_`` prefix): run it by hand where a GPU is lent::

    PYTHONPATH=. python tests/gpu/check_device.py --out DIR

1. graphteleport.torch on CUDA, float32 and float64: outputs before/after, parameters
   stay on their device and dtype.
2. torchvision / timm models (when importable): exported with torch.onnx (dynamo),
   teleported and verified by the CLI's pipeline; exit status, error, pins by reason.
Writes ``DIR/device_check.json`` and prints one line per case.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from graphteleport.pipeline import TeleportOptions, teleport_file
from graphteleport.torch import teleport
from models.architectures import ARCHITECTURES


class Timeout(Exception):
    pass


def _alarm(_signum: int, _frame: Any) -> None:
    raise Timeout


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def torch_case(name: str, device: str, dtype: torch.dtype, mode: str) -> dict[str, Any]:
    model, shape = ARCHITECTURES[name]()
    model = model.to(device=device, dtype=dtype).eval()
    x = torch.randn(*shape, device=device, dtype=dtype)
    ref = copy.deepcopy(model)
    kw: dict[str, Any] = {"seed": 0, "mode": mode}
    if mode == "insert":
        kw.update(sampling="inter_landscape", cob_range=0.9)
    t = time.perf_counter()
    r = teleport(model, x, **kw)
    dt = time.perf_counter() - t
    with torch.no_grad():
        err = rel_err(model(x), ref(x))
    where = {(p.device.type, p.dtype) for p in model.parameters()}
    return {
        "case": f"torch {name} {device} {dtype} {mode}",
        "rel_err": err,
        "free": r.free_cofactors,
        "changed": len(r.changed),
        "seconds": dt,
        "params_stay": where == {(torch.device(device).type, dtype)},
    }


def _zoo() -> list[tuple[str, Any, tuple[int, ...]]]:
    out: list[tuple[str, Any, tuple[int, ...]]] = []
    try:
        import torchvision.models as tvm

        for n in (
            "resnet18",
            "mobilenet_v2",
            "efficientnet_b0",
            "convnext_tiny",
            "regnet_y_400mf",
            "swin_t",
        ):
            out.append(
                (f"torchvision.{n}", lambda n=n: getattr(tvm, n)(weights=None), (1, 3, 224, 224))
            )
    except Exception as e:
        print("torchvision unavailable:", e)
    try:
        import timm

        for n in ("resnet50", "convnext_nano", "vit_tiny_patch16_224", "mobilenetv3_small_100"):
            out.append(
                (f"timm.{n}", lambda n=n: timm.create_model(n, pretrained=False), (1, 3, 224, 224))
            )
    except Exception as e:
        print("timm unavailable:", e)
    return out


def _randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.normal_(0, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            if m.weight is not None:
                m.weight.data.uniform_(0.5, 1.5, generator=g)
                m.bias.data.normal_(0, 0.1, generator=g)


def zoo_case(name: str, make: Any, shape: tuple[int, ...], out: Path, mode: str) -> dict[str, Any]:
    path = out / f"{name}.onnx"
    if not path.exists():
        model = make().eval()
        _randomize_bn(model)
        t = time.perf_counter()
        torch.onnx.export(
            model,
            (torch.randn(*shape),),
            str(path),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        print(f"  exported {name} in {time.perf_counter() - t:.1f}s", flush=True)
    opts = TeleportOptions(mode=mode, seed=0, rtol=1e-4)
    if mode == "insert":
        opts = dataclasses.replace(opts, sampling="inter_landscape", cob_range=0.9)
    rep = teleport_file(path, out / f"{name}.{mode}.teleported.onnx", opts).to_json()
    v = rep["verification"]
    return {
        "case": f"onnx {name} {mode}",
        "passed": v["passed"],
        "rel_err": v["max_rel_err"],
        "free": rep["free_cofactors"],
        "changed": rep["elements_changed"] / max(rep["elements_total"], 1),
        "pins": {p["reason"]: p["cofactors"] for p in rep["pinned"]},
        "nodes_added": rep["nodes_added"],
        "seconds": rep["seconds"]["total"],
    }


def guarded(fn: Any, *args: Any, limit: int = 90) -> dict[str, Any]:
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    try:
        return fn(*args)
    except Timeout:
        return {"case": " ".join(map(str, args[:2])), "error": f"timeout {limit}s"}
    except Exception as e:
        return {
            "case": " ".join(map(str, args[:2])),
            "error": f"{type(e).__name__}: {e}"[:400],
            "trace": traceback.format_exc()[-1500:],
        }
    finally:
        signal.alarm(0)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="device_check")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-zoo", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    print("torch", torch.__version__, "cuda", torch.cuda.is_available(), flush=True)
    for name in ("mlp", "resnet18", "vgg11_bn", "mobilenetv2", "transformer_mlp"):
        for dtype in (torch.float32, torch.float64):
            for mode in ("absorb", "insert"):
                if mode == "insert" and name not in ("mlp", "vgg11_bn"):
                    continue
                results.append(guarded(torch_case, name, args.device, dtype, mode))
                print(json.dumps(results[-1], default=str), flush=True)
    if not args.no_zoo:
        for name, make, shape in _zoo():
            for mode in ("absorb", "insert"):
                results.append(guarded(zoo_case, name, make, shape, out, mode, limit=150))
                print(json.dumps(results[-1], default=str), flush=True)
    (out / "device_check.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
