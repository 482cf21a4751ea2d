"""gemb export: the sentence-transformers / transformers folder embeds as gemb does."""

import json

import numpy as np
import pytest
from flax import traverse_util

from gemb import embed
from gemb.checkpoints import import_hf, layout, model_dir
from gemb.export import hf
from gemb.export import sentence_transformers as st_export
from tiny_checkpoints import write_tiny_model_folder

sentence_transformers = pytest.importorskip("sentence_transformers")

TEXTS = ["what is the capital of france", "paris", "the python function returns a list of code",
         "a", "the capital of france is paris <eos> text", "search result code"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    # Two projection layers (EmbeddingGemma's shape) so every Dense module is exercised.
    return write_tiny_model_folder(tmp_path_factory, head_dims=(96, 64), matryoshka_dims=(64, 32))


def _load(folder):
    return sentence_transformers.SentenceTransformer(str(folder), device="cpu")


@pytest.mark.parametrize("role,task,prompt_name", [("query", "search", "query"),
                                                   ("document", "search", "document"),
                                                   ("query", "sentence_similarity",
                                                    "sentence_similarity_query")])
def test_sentence_transformers_embeddings_equal_gemb(tiny_model, tmp_path, role, task,
                                                     prompt_name):
    out = st_export.export(tiny_model, tmp_path / "st")
    expected = embed.load_encoder(tiny_model).encode(TEXTS, role=role, task=task)
    got = _load(out).encode(TEXTS, prompt_name=prompt_name, convert_to_numpy=True)
    assert got.shape == expected.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_matryoshka_dim_and_head_none(tiny_model, tmp_path):
    short = st_export.export(tiny_model, tmp_path / "short", dim=32)
    expected = embed.load_encoder(tiny_model, dim=32).encode(TEXTS, role="query", task="search")
    np.testing.assert_allclose(_load(short).encode(TEXTS, prompt_name="query"), expected,
                               atol=2e-5)
    pooled = st_export.export(tiny_model, tmp_path / "pooled", head=False)
    expected = embed.load_encoder(tiny_model, head=False).encode(TEXTS)
    got = _load(pooled).encode(TEXTS)
    assert got.shape == (len(TEXTS), 64)  # TINY's hidden width, no projection, no normalising
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-5)


def test_hf_format_round_trips_exactly(tiny_model, tmp_path):
    out = st_export.export(tiny_model, tmp_path / "hf", fmt="hf")
    config, _ = model_dir.read_model_config(tiny_model)
    imported_config, upstream = import_hf.load_hf(out)
    assert imported_config == config.transformer.replace(
        scan_layers=imported_config.scan_layers, attention_mode=imported_config.attention_mode,
        bidirectional_window=imported_config.bidirectional_window,
        remat_policy=imported_config.remat_policy)
    original = layout.to_upstream_layout(model_dir.load_params(tiny_model)["transformer"],
                                         config.transformer)
    flat = lambda tree: {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}
    a, b = flat(original), flat(upstream)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["use_bidirectional_attention"] is True
    assert not (out / "modules.json").exists()


def test_bfloat16_export(tiny_model, tmp_path):
    out = st_export.export(tiny_model, tmp_path / "bf16", dtype="bfloat16")
    tensors = import_hf.read_safetensors(out / "model.safetensors")
    assert {str(t.dtype) for t in tensors.values()} == {"bfloat16"}
    expected = embed.load_encoder(tiny_model).encode(TEXTS, role="query", task="search")
    got = _load(out).encode(TEXTS, prompt_name="query")
    assert np.min(np.sum(got * expected, axis=-1)) > 0.99  # bf16 rounding only


def test_prompts_are_gemb_templates():
    prompts = st_export.prompts()
    assert prompts["query"] == "task: search result | query: "
    assert prompts["document"] == "title: none | text: "
    assert prompts["sentence_similarity_document"] == "task: sentence similarity | query: "


def test_bad_exports_are_clear_errors(tiny_model, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        st_export.export(tiny_model, tmp_path / "busy")
    assert (tmp_path / "busy" / "file").read_text() == "keep me"
    with pytest.raises(ValueError, match="Drop --dim"):
        st_export.export(tiny_model, tmp_path / "a", dim=32, head=False)
    with pytest.raises(ValueError, match="Matryoshka width"):
        st_export.export(tiny_model, tmp_path / "b", dim=65)
    with pytest.raises(FileNotFoundError, match="not a gemb model folder"):
        st_export.export(tmp_path, tmp_path / "c")
    config, _ = model_dir.read_model_config(tiny_model)
    with pytest.raises(ValueError, match="no transformers equivalent"):
        hf.hf_text_config(config.transformer.replace(bidirectional_window="full"))
    assert st_export.main(["--model", str(tiny_model), "--out", str(tmp_path / "busy")]) == 1


def test_safetensors_writer_round_trips(tmp_path):
    import ml_dtypes

    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
               "b": np.array([1.5, -2.0], ml_dtypes.bfloat16), "c": np.zeros((0, 4), np.float16)}
    hf.write_safetensors(tmp_path / "x.safetensors", tensors)
    back = import_hf.read_safetensors(tmp_path / "x.safetensors")
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype
        np.testing.assert_array_equal(back[name], value)
    with pytest.raises(ValueError, match="dtype int32"):
        hf.write_safetensors(tmp_path / "y.safetensors", {"n": np.zeros(2, np.int32)})


REAL_TEXTS = [
    "The history of the printing press begins long before Gutenberg.",
    "Москва является столицей Российской Федерации.",
    "東京は日本の首都であり、世界で最も人口の多い都市圏の一つです。",
    "भारत दक्षिण एशिया में स्थित एक विशाल देश है।",
    "def binary_search(items, target):\n    low, high = 0, len(items) - 1\n",
    "A document that quotes <eos> and <bos> as plain text.",
]


@pytest.mark.slow
def test_real_gemma3_270m_through_sentence_transformers(gemma3_270m_model_dir, tmp_path):
    """The real weights and SentencePiece tokenizer: transformers' Gemma3TextModel (bidirectional)
    + Pooling + Dense + Normalize from the exported folder embed as gemb does."""
    out = st_export.export(gemma3_270m_model_dir, tmp_path / "st", dim=768)
    model = _load(out)
    # One device: the 8 fake CPU devices of the test session would each hold a copy of the params.
    import jax

    from gemb.partitioning import mesh as mesh_lib
    from gemb.partitioning import partitioner as partitioner_lib

    encoder = embed.load_encoder(gemma3_270m_model_dir, dim=768, task="search",
                                 partitioner=partitioner_lib.Partitioner(
                                     mesh_lib.create_mesh(devices=jax.devices()[:1])))
    for role, prompt_name in (("query", "query"), ("document", "document")):
        ids = model.tokenize([model.prompts[prompt_name] + REAL_TEXTS[-1]])["input_ids"][0]
        assert ids.tolist() == encoder.tokenize(encoder.format(REAL_TEXTS[-1:], role))[0]
        expected = encoder.encode(REAL_TEXTS, role=role)
        got = model.encode(REAL_TEXTS, prompt_name=prompt_name, convert_to_numpy=True)
        assert got.shape == (len(REAL_TEXTS), 768)
        np.testing.assert_allclose(got, expected, atol=1e-5)  # measured 3e-7
