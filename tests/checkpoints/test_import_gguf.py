"""GGUF import: the real 270M file, and the errors a user can cause."""

import numpy as np
import pytest

from gemb.checkpoints import import_gguf, layout

gguf = pytest.importorskip("gguf")


def test_real_gguf_counts_and_norm_offset(gemma3_270m_gguf, gemma3_270m_upstream):
    preset, upstream = gemma3_270m_upstream
    assert preset.name == "gemma3_270m"
    flat = layout._flatten(upstream)
    assert sum(v.size for v in flat.values()) == 268_098_176
    reader = gguf.GGUFReader(gemma3_270m_gguf)
    stored = {t.name: np.asarray(t.data) for t in reader.tensors if t.name.endswith("norm.weight")}
    # GGUF stores 1 + w; gemb keeps upstream's zero-centred w.
    np.testing.assert_allclose(upstream["layer_3"]["pre_attention_norm"]["scale"],
                               stored["blk.3.attn_norm.weight"] - 1.0)
    np.testing.assert_allclose(upstream["layer_0"]["attn"]["_key_norm"]["scale"],
                               stored["blk.0.attn_k_norm.weight"] - 1.0)
    np.testing.assert_allclose(upstream["final_norm"]["scale"], stored["output_norm.weight"] - 1.0)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.gguf does not exist"):
        import_gguf.load_gguf(tmp_path / "absent.gguf")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        import_gguf.load_gguf(path)


def test_truncated_gguf(tmp_path, gemma3_270m_gguf):
    path = tmp_path / "truncated.gguf"
    with open(gemma3_270m_gguf, "rb") as source:
        path.write_bytes(source.read(30_000_000))
    with pytest.raises(ValueError, match="damaged or truncated GGUF file"):
        import_gguf.load_gguf(path)


def test_gguf_of_another_architecture(tmp_path):
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="holds a 'llama' model; gemb imports Gemma 3"):
        import_gguf.load_gguf(path)
