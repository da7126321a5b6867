"""Small Hugging Face ``transformers`` models built from configs — no download, no
``from_pretrained`` — and a quiet ONNX export for them.

These are architectures nobody on this team wrote: the point is to run graphteleport on graphs
shaped the way a third-party library shapes them: HF's ResNet (basic and bottleneck), ConvNeXt
(V1, V2), MobileNetV2, RegNet (X, Y), EfficientNet and MobileViT image models, ViT and Swin,
BERT/DistilBERT/ALBERT encoders, a T5 encoder, GPT-2 with its tied LM head, a LLaMA-style
decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention) and a wav2vec2 audio classifier.

The registry ``HF_MODELS`` is a table: each entry names a ``transformers`` model class, its
config class and values, its example inputs; ``HF_MODELS[name].build(seed)`` returns
``(model, inputs)``: the HF model in eval mode and a dict of example
inputs (keyword name -> tensor) in the order of the exported graph's inputs.  Sizes are
test-sized (one to three layers, hidden sizes 16-64, 32-px images, 8 tokens).  Weights are
seeded and made non-degenerate (DESIGN.md §9):

* everything HF initialises to a constant (norm affines, zero biases, ConvNeXt's 1e-6 layer
  scale) is re-randomised with :func:`models.architectures.randomize_`; RMSNorm-style scales it
  does not recognise get U[0.5, 1.5];
* ``initializer_range=0.2`` instead of HF's 0.02 for transformers and ConvNeXt, whose outputs
  are otherwise nearly independent of the input;
* BatchNorm running statistics are measured on a seeded random batch, under a seeded RNG
  (made-up statistics on top of HF's std-0.02 convolutions make MobileNetV2 and EfficientNet
  constant functions).

``gpt2_init`` keeps HF's own initialisation instead (all-ones LayerNorm weights, zero biases),
which the dynamo exporter merges into shared initializers.

``export_hf(model, inputs, path)`` wraps the model so its outputs are plain tensors
(``return_dict=False``, ``use_cache=False``; the logits only, unless asked otherwise) and runs
``torch.onnx.export(dynamo=True, external_data=False)`` with exporter chatter silenced.

timm and torchvision are not covered: timm depends on torchvision, whose wheels pin a CUDA torch
build (~5.5 GB) that cannot be installed on this project's CPU-only machines.

CLI: ``python -m models.hf --out DIR [NAME ...]`` exports registry entries to ``DIR/NAME.onnx``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.architectures import randomize_
from models.export import LEGACY_DEFAULT_OPSET, export_each, quiet

Inputs = dict[str, torch.Tensor]
Built = tuple[nn.Module, Inputs]

IMAGE = 32
"""Side of the square example images."""
SEQ = 8
"""Length of the example token sequences."""
VOCAB = 97
"""Vocabulary size of the text models (prime, so it shows up clearly in shapes)."""
INIT_RANGE = 0.2
"""``initializer_range`` for the transformers (HF's 0.02 gives near-constant outputs)."""


def _transformers() -> Any:
    import transformers  # deferred: the module is importable without transformers

    return transformers


def _seeded(
    build: Callable[[], nn.Module], seed: int, randomize: bool, calibrate: Inputs | None = None
) -> nn.Module:
    """Build under a forked, seeded RNG; then re-randomise constants (``randomize_``) and, given
    a batch of ``calibrate`` inputs, set the BatchNorm running statistics from it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    if randomize:
        _randomize_scales(model, seed)
        randomize_(model, seed)
    if calibrate is not None:
        with torch.random.fork_rng(devices=[]):  # dropout in the train-mode pass: seeded too
            torch.manual_seed(seed + 2000)
            _calibrate_batchnorm(model, calibrate)
    return model.eval()


@torch.no_grad()
def _calibrate_batchnorm(model: nn.Module, inputs: Inputs) -> None:
    """Replace every BatchNorm's running mean/variance by the statistics of ``inputs``.

    HF's CNNs initialise convolutions with std 0.02, so activations shrink layer by layer;
    with made-up running statistics (``randomize_``: mean ~ N(0, 0.5²)) the BatchNorms then
    output their shifts, and MobileNetV2 or EfficientNet compute a constant function of their
    input.  Statistics measured on a random batch keep every layer's output at unit scale."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration pass
    model.train()
    try:
        model(**inputs)
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum
        model.eval()


def _calibration(seed: int, size: int = IMAGE, batch: int = 8) -> Inputs:
    gen = torch.Generator().manual_seed(seed + 1000)
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=gen)}


@torch.no_grad()
def _randomize_scales(model: nn.Module, seed: int) -> None:
    """Norm-like scales that ``randomize_`` does not recognise (HF's own RMSNorm classes hold a
    ``weight`` of ones but are no ``nn.LayerNorm``): U[0.5, 1.5] instead of the small
    U[0.05, 0.5] that ``randomize_`` gives any other constant vector."""
    gen = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if "RMSNorm" in type(module).__name__ or "LayerNorm" in type(module).__name__:
            w = getattr(module, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 1 and bool((w == 1).all()):
                w.copy_(torch.rand(w.shape, generator=gen) + 0.5)


def _image(seed: int = 0, size: int = IMAGE, channels: int = 3) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(1, channels, size, size, generator=gen)}


def _tokens(seed: int = 0, length: int = SEQ, mask: bool = False, types: bool = False) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(0, VOCAB, (1, length), generator=gen)}
    if mask:
        out["attention_mask"] = torch.ones(1, length, dtype=torch.long)
    if types:
        out["token_type_ids"] = torch.zeros(1, length, dtype=torch.long)
    return out


def _audio(seed: int = 0, samples: int = 400) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    return {"input_values": torch.randn(1, samples, generator=gen)}


# --------------------------------------------------------------------------------------------
# the registry: a transformers model class, its config, and how it is seeded and fed
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A registry entry: ``transformers.<model>(<config>(**values))``, built under a seeded RNG
    (constants re-randomised unless ``randomize`` is off; BatchNorm statistics measured on a
    calibration batch if ``calibrate``), fed ``inputs(seed)``; which outputs to export (indices
    into the model's ``return_dict=False`` tuple) and the kind of model."""

    model: str
    config: str
    values: Mapping[str, Any]
    doc: str
    inputs: Callable[[int], Inputs] = _image
    calibrate: bool = False
    randomize: bool = True
    outputs: tuple[int, ...] = (0,)
    kind: str = "vision"

    def build(self, seed: int = 0) -> Built:
        t = _transformers()
        cfg = getattr(t, self.config)(**self.values)
        calibration = _calibration(seed) if self.calibrate else None
        model = _seeded(lambda: getattr(t, self.model)(cfg), seed, self.randomize, calibration)
        return model, self.inputs(seed)


def _cnn(model: str, config: str, doc: str, **values: Any) -> Entry:
    """An image CNN with BatchNorm: statistics from a calibration batch."""
    return Entry(model, config, {"num_labels": 10, **values}, doc, calibrate=True)


def _text(model: str, config: str, doc: str, values: Mapping[str, Any], **kw: Any) -> Entry:
    return Entry(model, config, values, doc, **{"inputs": _tokens, "kind": "text", **kw})


_RESNET = {"embedding_size": 16, "hidden_sizes": [16, 32, 64], "depths": [1, 1, 1]}
_CONVNEXT = {"hidden_sizes": [16, 32, 64], "depths": [1, 1, 1], "num_stages": 3, "patch_size": 4,
             "image_size": IMAGE}  # fmt: skip
_BERT = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 32,
    "initializer_range": INIT_RANGE,
}
_GPT2 = {
    "vocab_size": VOCAB,
    "n_positions": 32,
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 2,
    "initializer_range": INIT_RANGE,
    "tie_word_embeddings": True,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
_GPT2_DOC = "``GPT2LMHeadModel``: Conv1D projections, gelu_new, the LM head tied to ``wte``."

HF_MODELS: dict[str, Entry] = {
    "resnet_basic": _cnn(
        "ResNetForImageClassification", "ResNetConfig",
        "``ResNetForImageClassification``, basic blocks, widths 16-64, depths (1, 1, 1).",
        **_RESNET, layer_type="basic",
    ),
    "resnet_bottleneck": _cnn(
        "ResNetForImageClassification", "ResNetConfig",
        "``ResNetForImageClassification``, bottleneck blocks (1x1-3x3-1x1, reduction 4).",
        embedding_size=16, hidden_sizes=[32, 64], depths=[2, 1], layer_type="bottleneck",
    ),
    "convnext": _cnn(
        "ConvNextForImageClassification", "ConvNextConfig",
        "``ConvNextForImageClassification``: depthwise 7x7, channels-last LayerNorm, GELU MLP, "
        "layer scale; widths 16-64, depths (1, 1, 1).",
        **_CONVNEXT, initializer_range=INIT_RANGE,
    ),
    "convnext_relu": _cnn(
        "ConvNextForImageClassification", "ConvNextConfig",
        "ConvNeXt with ``hidden_act=\"relu\"``: the MLP's hidden neurons become teleportable.",
        **_CONVNEXT, hidden_act="relu", initializer_range=INIT_RANGE,
    ),
    "mobilenet_v2": _cnn(
        "MobileNetV2ForImageClassification", "MobileNetV2Config",
        "``MobileNetV2ForImageClassification`` at depth multiplier 0.35 (ReLU6, TF padding).",
        image_size=IMAGE, depth_multiplier=0.35, classifier_dropout_prob=0.0,
    ),
    "regnet_x": _cnn(
        "RegNetForImageClassification", "RegNetConfig",
        "``RegNetForImageClassification``, X blocks (grouped 3x3 conv, no squeeze-excite).",
        **_RESNET, groups_width=8, layer_type="x",
    ),
    "regnet_y": _cnn(
        "RegNetForImageClassification", "RegNetConfig",
        "``RegNetForImageClassification``, Y blocks (X plus a sigmoid squeeze-excite).",
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, layer_type="y",
    ),
    "efficientnet": _cnn(
        "EfficientNetForImageClassification", "EfficientNetConfig",
        "``EfficientNetForImageClassification``: three MBConv stages, swish, squeeze-excite. "
        "``hidden_dim`` must equal the top conv's width ``round_filters(1280)`` (HF sizes the "
        "top BatchNorm by one and the conv by the other).",
        image_size=IMAGE, width_coefficient=0.25, depth_coefficient=0.5, kernel_sizes=[3, 3, 5],
        in_channels=[32, 16, 24], out_channels=[16, 24, 40], strides=[1, 2, 2],
        num_block_repeats=[1, 2, 1], expand_ratios=[1, 6, 6], hidden_dim=320, dropout_rate=0.0,
        drop_connect_rate=0.0,
    ),
    "convnext_v2": Entry(
        "ConvNextV2ForImageClassification", "ConvNextV2Config",
        {"num_stages": 2, "hidden_sizes": [16, 32], "depths": [1, 1], "patch_size": 4,
         "image_size": IMAGE, "num_labels": 10, "initializer_range": INIT_RANGE},
        "``ConvNextV2ForImageClassification``: ConvNeXt with global response normalisation "
        "(a per-channel L2 norm over space) in place of layer scale.",
    ),
    "mobilevit": _cnn(
        "MobileViTForImageClassification", "MobileViTConfig",
        "``MobileViTForImageClassification``: MobileNetV2 blocks (SiLU) around transformer "
        "blocks that unfold the feature map into patches and fold it back.",
        image_size=IMAGE, patch_size=2, hidden_sizes=[16, 24, 32],
        neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32], num_attention_heads=2,
        classifier_dropout_prob=0.0,
    ),
    "vit": Entry(
        "ViTForImageClassification", "ViTConfig",
        {"image_size": IMAGE, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 2, "intermediate_size": 64, "num_labels": 10,
         "initializer_range": INIT_RANGE},
        "``ViTForImageClassification``: 8-px patches of a 32-px image, 2 layers, width 32.",
        kind="transformer",
    ),
    "swin": Entry(
        "SwinForImageClassification", "SwinConfig",
        {"image_size": 16, "patch_size": 2, "embed_dim": 16, "depths": [2, 1],
         "num_heads": [2, 4], "window_size": 4, "num_labels": 10, "drop_path_rate": 0.0,
         "initializer_range": INIT_RANGE},
        "``SwinForImageClassification``: 2-px patches, window 4, two stages (shifted windows, "
        "patch merging).",
        inputs=lambda seed: _image(seed, 16), kind="transformer",
    ),
    "bert": _text(
        "BertModel", "BertConfig",
        "``BertModel`` (encoder + tanh pooler) on ``input_ids``, ``attention_mask``, "
        "``token_type_ids``; exported outputs: last hidden state and pooled output.",
        _BERT, inputs=lambda seed: _tokens(seed, mask=True, types=True), outputs=(0, 1),
    ),
    "bert_classifier": _text(
        "BertForSequenceClassification", "BertConfig",
        "``BertForSequenceClassification`` (3 labels) on ``input_ids`` only.",
        {**_BERT, "num_labels": 3},
    ),
    "distilbert": _text(
        "DistilBertForSequenceClassification", "DistilBertConfig",
        "``DistilBertForSequenceClassification`` on ``input_ids`` and ``attention_mask``.",
        {"vocab_size": VOCAB, "dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64,
         "max_position_embeddings": 32, "num_labels": 3, "initializer_range": INIT_RANGE,
         "seq_classif_dropout": 0.0},
        inputs=lambda seed: _tokens(seed, mask=True),
    ),
    "gpt2": _text("GPT2LMHeadModel", "GPT2Config", _GPT2_DOC, _GPT2),
    "gpt2_init": _text(
        "GPT2LMHeadModel", "GPT2Config",
        "GPT-2 with HF's own initialisation: every LayerNorm weight is ones and every bias "
        "zero, so the exporter merges them into shared initializers (DESIGN.md §9).",
        _GPT2, randomize=False,
    ),
    "llama": _text(
        "LlamaForCausalLM", "LlamaConfig",
        "``LlamaForCausalLM``: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention (4 query "
        "heads, 2 key/value heads), untied LM head.",
        {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 32, "initializer_range": INIT_RANGE,
         "tie_word_embeddings": False},
    ),
    "albert": _text(
        "AlbertForSequenceClassification", "AlbertConfig",
        "``AlbertForSequenceClassification``: one transformer layer's weights shared by all "
        "three layers (real weight ties, DESIGN.md §3), factorised 16-wide embedding.",
        {**_BERT, "embedding_size": 16, "num_hidden_layers": 3, "num_labels": 3,
         "classifier_dropout_prob": 0.0},
    ),
    "t5_encoder": _text(
        "T5EncoderModel", "T5Config",
        "``T5EncoderModel``: bias-free projections, T5's RMS LayerNorm, relative position bias "
        "(a bucketed embedding added to the attention scores), ReLU feed-forward.",
        {"vocab_size": VOCAB, "d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2,
         "num_heads": 2, "relative_attention_num_buckets": 8, "dropout_rate": 0.0},
    ),
    "wav2vec2": Entry(
        "Wav2Vec2ForSequenceClassification", "Wav2Vec2Config",
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 64, "conv_dim": (16, 16), "conv_stride": (5, 2),
         "conv_kernel": (10, 3), "num_conv_pos_embeddings": 8,
         "num_conv_pos_embedding_groups": 4, "num_labels": 3, "initializer_range": INIT_RANGE,
         "feat_extract_norm": "group", "classifier_proj_size": 16},
        "``Wav2Vec2ForSequenceClassification`` on 400 audio samples: a strided Conv1d feature "
        "encoder with GroupNorm, a grouped positional convolution, 2 transformer layers.",
        inputs=_audio, kind="audio",
    ),
}  # fmt: skip
"""Test-sized Hugging Face configurations by name."""


class TensorOutputs(nn.Module):
    """Calls an HF model with keyword inputs given positionally (in ``names`` order),
    ``return_dict=False`` and (where the model takes it) ``use_cache=False``, and returns the
    selected elements of its output tuple as plain tensors."""

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        outputs: Sequence[int] = (0,),
        use_cache: bool | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names)
        self.outputs = tuple(outputs)
        self.extra: dict[str, Any] = {"return_dict": False}
        if use_cache is not None:
            self.extra["use_cache"] = use_cache

    def forward(self, *args: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.names, args, strict=True)), **self.extra)
        picked = tuple(out[i] for i in self.outputs)
        return picked[0] if len(picked) == 1 else picked


def _takes_use_cache(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "use_cache")


def export_hf(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    path: str | Path,
    *,
    outputs: Sequence[int] = (0,),
    dynamic_shapes: Mapping[str, Mapping[int, Any]] | None = None,
    opset: int | None = None,
    optimize: bool = True,
    exporter: str = "dynamo",
) -> Path:
    """Export ``model`` (put in eval mode) on ``inputs`` to ``path`` with the dynamo exporter,
    weights embedded.  A dict of inputs is fed by keyword through :class:`TensorOutputs`
    (graph inputs take the dict's names, outputs are ``output`` or ``output_0``...); a sequence
    is passed positionally to ``model`` as is.  ``dynamic_shapes`` maps an input's name
    (``input_i`` for a sequence) to ``{axis: torch.export.Dim(...)}``; unnamed inputs stay
    static.  ``optimize`` is the exporter's flag (False keeps BatchNorm and the raw shape
    arithmetic; DESIGN.md §9).  ``exporter="legacy"`` uses the deprecated TorchScript exporter
    instead (``dynamo=False``, opset 17 unless given, constant folding on, no dynamic shapes);
    below opset 17 it writes LayerNorm out as ReduceMean/Sub/Pow/Sqrt/Div.  Exporter output is
    suppressed; on failure it is attached to the raised error as a note."""
    if exporter not in ("dynamo", "legacy"):
        raise ValueError(f"exporter must be 'dynamo' or 'legacy', not {exporter!r}")
    if exporter == "legacy" and dynamic_shapes:
        raise ValueError("dynamic_shapes needs the dynamo exporter")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    if isinstance(inputs, Mapping):
        names = list(inputs)
        use_cache = False if _takes_use_cache(model) else None
        wrapped: nn.Module = TensorOutputs(model, names, outputs, use_cache).eval()
        args = tuple(inputs[n] for n in names)
    else:
        names = [f"input_{i}" for i in range(len(inputs))]
        wrapped, args = model, tuple(inputs)
    dynamic = None
    if dynamic_shapes:
        per_input = tuple(dynamic_shapes.get(n) for n in names)
        dynamic = (per_input,) if isinstance(inputs, Mapping) else per_input
    out_names = ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
    with quiet() as log, torch.no_grad():
        try:
            if exporter == "legacy":
                torch.onnx.export(
                    wrapped,
                    args,
                    str(path),
                    dynamo=False,
                    do_constant_folding=True,
                    opset_version=opset or LEGACY_DEFAULT_OPSET,
                    input_names=names,
                    output_names=out_names,
                    training=torch.onnx.TrainingMode.EVAL,
                    verbose=False,
                )
            else:
                torch.onnx.export(
                    wrapped,
                    args,
                    str(path),
                    dynamo=True,
                    external_data=False,
                    optimize=optimize,
                    opset_version=opset,
                    input_names=names,
                    output_names=out_names,
                    dynamic_shapes=dynamic,
                    verbose=False,
                )
        except Exception as err:
            if log.getvalue().strip():
                err.add_note("exporter output:\n" + log.getvalue()[-4000:])
            raise
    return path


def export_entry(name: str, path: str | Path, seed: int = 0) -> Path:
    """Build registry entry ``name`` with ``seed`` and export it to ``path``."""
    entry = HF_MODELS[name]
    model, inputs = entry.build(seed)
    return export_hf(model, inputs, path, outputs=entry.outputs)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m models.hf --out DIR [NAME ...]``: one line per model; 1 if any failed."""
    parser = argparse.ArgumentParser(
        prog="python -m models.hf", description="Export small Hugging Face models to ONNX."
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"registry entries (default: all): {', '.join(HF_MODELS)}",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in HF_MODELS]
    if unknown:
        parser.error(f"unknown model(s): {', '.join(unknown)}")
    return export_each(args.names or list(HF_MODELS), args.out, export_entry)


if __name__ == "__main__":
    sys.exit(main())
