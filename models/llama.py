"""Generate LLaMA-shaped ONNX models of any size, weights in an external data file.

The graph is what a torch export of ``LlamaForCausalLM`` computes, written op by op:
token embedding (``Gather``), then per layer

    n = RMSNorm(x) · γ₁                     (Pow, ReduceMean, Add ε, Sqrt, Reciprocal, Mul, Mul)
    q, k, v = n Wq, n Wk, n Wv              ([H, H] MatMuls, no bias)
    q, k ← q·cos + rotate_half(q)·sin       (RoPE, optional; Slice, Neg, Concat)
    a = softmax(q kᵀ / √d + causal) v       (per head; Reshape/Transpose around it)
    x = x + a Wo
    n = RMSNorm(x) · γ₂
    x = x + (SiLU(n Wg) ⊙ n Wu) Wd          (SwiGLU: Sigmoid, Mul, Mul; [H, F], [F, H])

and a final RMSNorm and LM head (``[H, V]`` MatMul) giving ``logits`` ``[1, T, V]``.  With
``layers=32, hidden=4096`` (F = 11008, V = 32000, 32 heads) it has LLaMA-7B's 6.74 G
parameters: 13.5 GB in float16.

Weights are written straight to ``NAME.onnx.data`` as they are drawn, a block of at most
``_CHUNK`` elements at a time (uniform in ±1/√fan_in, RMSNorm scales in [0.5, 1.5]), so
making a 13.5 GB model takes minutes and tens of MB of memory; the proto holds only their
locations.  float32, float16 and bfloat16 (the top half of the float32, truncated) are
supported.  Input ``input_ids`` is int64 ``[1, T]``, static.

CLI: ``python -m models.llama OUT.onnx --layers 32 --hidden 4096 --dtype float16``.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper

_CHUNK = 1 << 22  # elements drawn and written at a time
_DTYPES = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
}
OPSET = 18


@dataclass(frozen=True)
class LlamaShape:
    """The size of a generated model.  ``intermediate`` 0 takes LLaMA's rule
    (⌈(8H/3) / 256⌉ · 256: 11008 for H = 4096); ``heads`` 0 takes H / 128 (at least 1)."""

    layers: int = 2
    hidden: int = 128
    dtype: str = "float32"
    vocab: int = 32000
    seq: int = 16
    heads: int = 0
    intermediate: int = 0
    rope: bool = True
    seed: int = 0

    @property
    def n_heads(self) -> int:
        return self.heads or max(1, self.hidden // 128)

    @property
    def ffn(self) -> int:
        return self.intermediate or 256 * math.ceil(8 * self.hidden / 3 / 256)

    @property
    def parameters(self) -> int:
        h, f = self.hidden, self.ffn
        per_layer = 4 * h * h + 3 * h * f + 2 * h
        return self.layers * per_layer + 2 * self.vocab * h + h


class _Builder:
    """Nodes, initializers and the data file of one model under construction."""

    def __init__(self, shape: LlamaShape, data: BinaryIO, location: str) -> None:
        self.shape = shape
        self.dtype = _DTYPES[shape.dtype]
        self.data = data
        self.location = location
        self.offset = 0
        self.rng = np.random.default_rng(shape.seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.count = 0

    def node(self, op: str, inputs: Sequence[str], **attrs: object) -> str:
        """Add one node and return the name of its (single) output."""
        self.count += 1
        out = f"{op.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], f"{op}_{self.count}", **attrs))
        return out

    def const(self, name: str, array: np.ndarray) -> str:
        """An inline initializer (shapes, axes, small tables)."""
        self.inits.append(onnx.numpy_helper.from_array(array, name))
        return name

    def weight(self, name: str, dims: tuple[int, ...], low: float, high: float) -> str:
        """An external initializer of uniform random values in [low, high), drawn and written
        a block at a time."""
        size = math.prod(dims)
        start = self.offset
        for i in range(0, size, _CHUNK):
            block = self.rng.random(min(_CHUNK, size - i), dtype=np.float32)
            block = block * np.float32(high - low) + np.float32(low)
            self.data.write(_encode(block, self.shape.dtype))
        nbytes = size * (4 if self.shape.dtype == "float32" else 2)
        self.offset += nbytes
        tensor = TensorProto(name=name, data_type=self.dtype, dims=list(dims))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", start), ("length", nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self.inits.append(tensor)
        return name

    def linear(self, name: str, x: str, fan_in: int, fan_out: int) -> str:
        bound = 1.0 / math.sqrt(fan_in)
        return self.node("MatMul", [x, self.weight(name, (fan_in, fan_out), -bound, bound)])

    def rmsnorm(self, name: str, x: str) -> str:
        """``x / √(mean(x²) + ε) · γ`` as torch exports LLaMA's RMSNorm."""
        sq = self.node("Pow", [x, "two"])
        mean = self.node("ReduceMean", [sq, "last_axis"], keepdims=1)
        inv = self.node("Reciprocal", [self.node("Sqrt", [self.node("Add", [mean, "eps"])])])
        gamma = self.weight(name, (self.shape.hidden,), 0.5, 1.5)
        return self.node("Mul", [self.node("Mul", [x, inv]), gamma])


def _encode(block: np.ndarray, dtype: str) -> bytes:
    """float32 values as the bytes of ``dtype`` (bfloat16: the top 16 bits)."""
    if dtype == "float32":
        return block.tobytes()
    if dtype == "float16":
        return block.astype(np.float16).tobytes()
    return (block.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def _constants(b: _Builder) -> None:
    """The shared constants: exponent, ε, axes, shapes, the causal mask, RoPE tables."""
    s = b.shape
    d = s.hidden // s.n_heads
    for name, value in (("two", 2.0), ("eps", 1e-5), ("scale", 1.0 / math.sqrt(d))):
        b.inits.append(_float_proto(name, np.array(value, dtype=np.float32), b.shape.dtype))
    b.const("last_axis", np.array([-1], dtype=np.int64))
    b.const("heads_shape", np.array([1, s.seq, s.n_heads, d], dtype=np.int64))
    b.const("hidden_shape", np.array([1, s.seq, s.hidden], dtype=np.int64))
    mask = np.triu(np.full((s.seq, s.seq), -1e4, dtype=np.float32), k=1)
    b.inits.append(_float_proto("causal_mask", mask, b.shape.dtype))
    if s.rope:
        pos = np.arange(s.seq, dtype=np.float64)[:, None]
        freq = 10000.0 ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        angles = np.concatenate([pos * freq, pos * freq], axis=1)
        b.inits.append(_float_proto("rope_cos", np.cos(angles).astype(np.float32), s.dtype))
        b.inits.append(_float_proto("rope_sin", np.sin(angles).astype(np.float32), s.dtype))
        for name, value in (("half_start", 0), ("half_mid", d // 2), ("half_end", d)):
            b.const(name, np.array([value], dtype=np.int64))


def _float_proto(name: str, array: np.ndarray, dtype: str) -> TensorProto:
    """An inline float32 array stored in ``dtype``."""
    raw = _encode(array.astype(np.float32).ravel(), dtype)
    return helper.make_tensor(name, _DTYPES[dtype], array.shape, raw, raw=True)


def _rope(b: _Builder, x: str) -> str:
    """``x·cos + rotate_half(x)·sin`` on ``[1, heads, T, d]``."""
    lo = b.node("Slice", [x, "half_start", "half_mid", "last_axis"])
    hi = b.node("Slice", [x, "half_mid", "half_end", "last_axis"])
    rotated = b.node("Concat", [b.node("Neg", [hi]), lo], axis=-1)
    return b.node("Add", [b.node("Mul", [x, "rope_cos"]), b.node("Mul", [rotated, "rope_sin"])])


def _heads(b: _Builder, x: str) -> str:
    """``[1, T, H]`` → ``[1, heads, T, d]``."""
    return b.node("Transpose", [b.node("Reshape", [x, "heads_shape"])], perm=[0, 2, 1, 3])


def _attention(b: _Builder, i: int, x: str) -> str:
    h = b.shape.hidden
    q, k, v = (_heads(b, b.linear(f"layers.{i}.attn.{p}.weight", x, h, h)) for p in "qkv")
    if b.shape.rope:
        q, k = _rope(b, q), _rope(b, k)
    scores = b.node("MatMul", [q, b.node("Transpose", [k], perm=[0, 1, 3, 2])])
    scores = b.node("Add", [b.node("Mul", [scores, "scale"]), "causal_mask"])
    mixed = b.node("MatMul", [b.node("Softmax", [scores], axis=-1), v])
    merged = b.node("Reshape", [b.node("Transpose", [mixed], perm=[0, 2, 1, 3]), "hidden_shape"])
    return b.linear(f"layers.{i}.attn.o.weight", merged, h, h)


def _mlp(b: _Builder, i: int, x: str) -> str:
    h, f = b.shape.hidden, b.shape.ffn
    gate = b.linear(f"layers.{i}.mlp.gate.weight", x, h, f)
    up = b.linear(f"layers.{i}.mlp.up.weight", x, h, f)
    silu = b.node("Mul", [gate, b.node("Sigmoid", [gate])])
    return b.linear(f"layers.{i}.mlp.down.weight", b.node("Mul", [silu, up]), f, h)


def make_llama(path: str | os.PathLike[str], shape: LlamaShape) -> list[Path]:
    """Write a LLaMA-shaped model to ``path`` and its weights to ``path + ".data"``;
    returns both paths.  Nothing is written atomically: this makes test models."""
    if shape.dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {shape.dtype!r}")
    if shape.hidden % shape.n_heads or (shape.hidden // shape.n_heads) % 2:
        raise ValueError("hidden must split into heads of even size")
    model_path = Path(path)
    data_path = model_path.with_name(model_path.name + ".data")
    with open(data_path, "wb") as data:
        b = _Builder(shape, data, data_path.name)
        _constants(b)
        x = b.node("Gather", [b.weight("embed.weight", (shape.vocab, shape.hidden), -1, 1), "ids"])
        for i in range(shape.layers):
            x = b.node("Add", [x, _attention(b, i, b.rmsnorm(f"layers.{i}.norm1.weight", x))])
            x = b.node("Add", [x, _mlp(b, i, b.rmsnorm(f"layers.{i}.norm2.weight", x))])
        norm = b.rmsnorm("norm.weight", x)
        b.linear("lm_head.weight", norm, shape.hidden, shape.vocab)
    b.nodes[-1].output[0] = "logits"
    graph = helper.make_graph(
        b.nodes,
        "llama",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, shape.seq])],
        [helper.make_tensor_value_info("logits", b.dtype, [1, shape.seq, shape.vocab])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.save(model, model_path)
    return [model_path, data_path]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="model path; the weights go to OUT.data")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--heads", type=int, default=0, help="0: hidden / 128")
    ap.add_argument("--intermediate", type=int, default=0, help="0: LLaMA's rule")
    ap.add_argument("--no-rope", dest="rope", action="store_false")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    shape = LlamaShape(
        a.layers, a.hidden, a.dtype, a.vocab, a.seq, a.heads, a.intermediate, a.rope, a.seed
    )
    paths = make_llama(a.out, shape)
    size = paths[1].stat().st_size / 1e9
    print(f"{paths[0]}: {shape.parameters / 1e9:.3f} G parameters, {size:.2f} GB of {shape.dtype}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
