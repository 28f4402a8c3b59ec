"""passes.tools.embed: bucketing, the LRU cache, and agreement with transformers mean pooling."""

from __future__ import annotations

import numpy as np
import pytest

from passes.tools.embed import Embedder
from passes.tools.export import minilm_dir

TEXTS = [
    "A short one.",
    "The quick brown fox jumps over the lazy dog near the quiet river bank at dawn.",
    "Compilers turn graphs into faster graphs.",
    "A short one.",
    "Tokenization splits text into word pieces before the encoder sees it, one id per piece.",
]


@pytest.mark.slow
def test_embeddings_match_transformers_and_cache_and_bucketing_work(exported) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModel, AutoTokenizer

    path = exported("minilm")
    emb = Embedder(path, minilm_dir(), threads=1, batch_size=2)
    got = emb.embed(TEXTS)
    assert got.shape == (5, 384)
    assert emb.runs == 2  # 4 unique texts in batches of 2: the repeat was answered by the cache
    np.testing.assert_array_equal(got[0], got[3])

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    model = AutoModel.from_pretrained(str(minilm_dir())).eval()
    with torch.no_grad():
        enc = tok(TEXTS, padding=True, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        ref = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=1).numpy()
    np.testing.assert_allclose(got, ref, atol=2e-5)

    again = emb.embed(TEXTS)
    assert emb.runs == 2 and emb.cache_hits >= 5
    np.testing.assert_array_equal(again, got)


def test_missing_tokenizer_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Embedder(tmp_path / "m.onnx", tmp_path)


def test_the_compiled_model_cache_key_follows_the_compiler_sources(tmp_path) -> None:
    from passes.tools.embed import compiler_fingerprint

    assert compiler_fingerprint() == compiler_fingerprint() and len(compiler_fingerprint()) == 12
    (tmp_path / "passes").mkdir()
    (tmp_path / "targets").mkdir()
    (tmp_path / "passes" / "p.py").write_text("x = 1\n")
    (tmp_path / "targets" / "t.toml").write_text('name = "t"\n')
    before = compiler_fingerprint(tmp_path)
    (tmp_path / "targets" / "t.toml").write_text('name = "t"\nresidual_layer_norm = "sum"\n')
    assert compiler_fingerprint(tmp_path) != before
    (tmp_path / "passes" / "notes.txt").write_text("not a source")
    changed = compiler_fingerprint(tmp_path)
    (tmp_path / "passes" / "notes.txt").write_text("still not a source")
    assert compiler_fingerprint(tmp_path) == changed
