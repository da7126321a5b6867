"""Free-cofactor counts of a BERT encoder, derived by hand and checked against the tool.

Built from a ``transformers`` config (no download), exported with the dynamo exporter.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from graphteleport.analysis import analyze  # noqa: E402
from graphteleport.io import load_model  # noqa: E402

H, I, L, HEADS, T = 32, 64, 2, 4, 8
SHAPES = {"input_ids": (1, T), "attention_mask": (1, T)}


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from graphteleport.frontends.torch import quiet

    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=L,
        num_attention_heads=HEADS,
        vocab_size=100,
        max_position_embeddings=64,
    )
    model = transformers.BertModel(config, add_pooling_layer=False).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    ids = torch.randint(0, 100, (1, T))
    mask = torch.ones(1, T, dtype=torch.long)
    with quiet():
        torch.onnx.export(
            Encoder().eval(),
            (ids, mask),
            str(path),
            dynamo=True,
            external_data=False,
            input_names=list(SHAPES),
        )
    return path


def test_bert_absorb_mode_count(bert: Path) -> None:
    """Absorb mode: ``L · 2H`` free cofactors.

    Per layer:

    * Q/K: scores = Q·Kᵀ contract the head dimension, so Q's neuron d of head h and
      K's neuron d of head h take inverse cofactors (τ_K = 1/τ_Q): one free cofactor
      per head dimension, ``heads · head_dim = H``;
    * V/O: softmax probabilities carry no cofactor, so P·V keeps V's per-head-dimension
      cofactors, which the output projection absorbs: ``H``;
    * FFN hidden: GELU is not equivariant, so its ``I`` neurons are pinned;
    * norm outputs: in this post-LN encoder the LayerNorm output *is* the residual
      stream, which reaches the next LayerNorm's input (normalized, pinned) through the
      residual Add: 0.

    Embeddings: their sum only feeds the embedding LayerNorm (pinned): 0.
    """
    q = analyze(load_model(bert), SHAPES, "absorb")
    assert q.free_cofactors == L * 2 * H
    reasons = {p.reason: p.cofactors for p in q.pinned()}
    assert reasons["Gelu is not equivariant (use --mode insert)"] == L * I


def test_bert_insert_mode_count(bert: Path) -> None:
    """Insert mode: ``H + L · (4H + I)`` free cofactors.

    Normalisations read their input unscaled (a Mul on the edge) and GELU is wrapped,
    so per layer: Q/K ``H``, V/O ``H``, the stream after the attention LayerNorm ``H``,
    the FFN hidden neurons ``I``, the stream after the FFN LayerNorm ``H`` (the
    attention and FFN output projections are tied to the stream they are added to).
    Plus the embedding sum ``H`` and the stream after the embedding LayerNorm ``H``,
    minus the last layer's output stream, which is the graph output (pinned): ``−H``.
    """
    q = analyze(load_model(bert), SHAPES, "insert")
    assert q.free_cofactors == H + L * (4 * H + I)
