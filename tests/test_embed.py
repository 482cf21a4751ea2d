"""The text API and `gemb embed`: batching by length, templates, heads, bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemb import embed
from gemb.checkpoints import model_dir
from gemb.models import encoder as encoder_lib
from gemb.models import heads
from gemb.partitioning import mesh as mesh_lib
from gemb.partitioning import partitioner as partitioner_lib
from tiny_checkpoints import write_tiny_model_folder

TEXTS = ["what is the capital of france", "paris", "the python function returns a list of code",
         "a", "query text", "the capital of france is paris", "search result", "code"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_model_folder(tmp_path_factory, head_dims=(96,), matryoshka_dims=(96, 48))


def _one_device():
    return partitioner_lib.Partitioner(mesh_lib.create_mesh(devices=jax.devices()[:1]))


def test_encode_equals_the_model_one_text_at_a_time(tiny_model):
    text_encoder = embed.load_encoder(tiny_model, batch_size=3, partitioner=_one_device())
    vectors = text_encoder.encode(TEXTS)
    assert vectors.shape == (len(TEXTS), 96)
    config, _ = model_dir.read_model_config(tiny_model)
    params = model_dir.load_params(tiny_model)
    model = encoder_lib.Encoder(config)
    apply = jax.jit(model.apply)  # one compile per length beats op-by-op dispatch of each text
    for i, text in enumerate(TEXTS):
        ids = text_encoder.tokenizer.encode(text)
        projected = apply({"params": params}, jnp.asarray([ids]))["projected"]
        expected = heads.matryoshka_embedding(projected, 96)[0, 0]
        np.testing.assert_allclose(vectors[i], expected, atol=2e-5)


def test_sharded_encoder_matches_single_device(tiny_model):
    single = embed.load_encoder(tiny_model, partitioner=_one_device()).encode(TEXTS)
    sharded_encoder = embed.load_encoder(
        tiny_model, batch_size=4, partitioner=partitioner_lib.Partitioner(mesh_lib.create_mesh((4, 2, 1))))
    assert sharded_encoder.batch_size == 8  # rounded up to whole rows per device
    np.testing.assert_allclose(sharded_encoder.encode(TEXTS), single, atol=1e-5)


def test_dim_head_none_and_task_templates(tiny_model):
    full = embed.load_encoder(tiny_model, partitioner=_one_device()).encode(TEXTS[:2])
    short = embed.load_encoder(tiny_model, dim=48, partitioner=_one_device()).encode(TEXTS[:2])
    np.testing.assert_allclose(np.linalg.norm(short, axis=-1), 1.0, rtol=1e-5)
    assert not np.allclose(short, full[:, :48])  # a prefix, re-normalised
    pooled = embed.load_encoder(tiny_model, head=False, partitioner=_one_device()).encode(TEXTS[:2])
    assert pooled.shape == (2, 64)
    with pytest.raises(ValueError, match="Drop --dim"):
        embed.load_encoder(tiny_model, head=False, dim=48, partitioner=_one_device())
    templated = embed.load_encoder(tiny_model, task="search", partitioner=_one_device())
    assert templated.format(["paris"], "query") == ["task: search result | query: paris"]
    assert templated.format(["paris"], "document") == ["title: none | text: paris"]
    assert not np.allclose(templated.encode(TEXTS[:2]), full)
    with pytest.raises(ValueError, match="has no template"):
        embed.load_encoder(tiny_model, task="poetry", partitioner=_one_device())


def test_overlong_text_truncates_with_a_count_or_errors(tiny_model, caplog):
    long_text = " ".join(["code"] * 40)
    encoder = embed.load_encoder(tiny_model, max_length=16, partitioner=_one_device())
    vectors = encoder.encode([long_text, "paris"])
    assert encoder.truncated_count == 1 and np.isfinite(vectors).all()
    assert "1 of 2 texts were longer than max_length=16" in caplog.text
    strict = embed.load_encoder(tiny_model, max_length=16, on_overlong="error", partitioner=_one_device())
    with pytest.raises(ValueError, match=r"texts\[0\] has 41 tokens, more than max_length=16"):
        strict.encode([long_text])


def test_bad_texts_are_named(tiny_model):
    encoder = embed.load_encoder(tiny_model, partitioner=_one_device())
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        encoder.encode(["paris", "   "])
    with pytest.raises(TypeError, match=r"texts\[0\] is a int"):
        encoder.encode([3])
    with pytest.raises(TypeError, match="list of texts"):
        encoder.encode("paris")


def test_cli_txt_and_jsonl(tiny_model, tmp_path, capsys):
    txt = tmp_path / "in.txt"
    txt.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "out.npy"
    assert embed.main(["--model", str(tiny_model), "--input", str(txt), "--output", str(out),
                       "--dim", "48"]) == 0
    assert np.load(out).shape == (len(TEXTS), 48)
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": t}) for t in TEXTS))
    assert embed.main(["--model", str(tiny_model), "--input", str(jsonl), "--output", str(out),
                       "--text-field", "body", "--head", "none"]) == 0
    assert np.load(out).shape == (len(TEXTS), 64)
    assert embed.main(["--model", str(tiny_model), "--input", str(jsonl), "--output",
                       str(out)]) == 2
    assert "in.jsonl:1 has no 'text' field" in capsys.readouterr().err


def _embed_file(tiny_model, tmp_path, content: bytes, *extra, suffix=".txt"):
    source = tmp_path / f"in{suffix}"
    source.write_bytes(content)
    out = tmp_path / "out.npy"
    if out.exists():
        out.unlink()
    code = embed.main(["--model", str(tiny_model), "--input", str(source), "--output", str(out),
                       *extra])
    return code, (np.load(out) if out.exists() else None), source


def test_cli_rows_are_lines_split_on_newline_only(tiny_model, tmp_path):
    # U+2028, U+0085, form feed and the \x1c-\x1e separators are text, not line ends.
    lines = ["first\u2028still first", "second\x85and\x0cthird\x1cfourth\x1d\x1e", "last"]
    code, vectors, _ = _embed_file(tiny_model, tmp_path, "\r\n".join(lines).encode() + b"\r\n")
    assert code == 0 and vectors.shape[0] == 3
    expected = embed.load_encoder(tiny_model, partitioner=_one_device()).encode(lines)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


def test_cli_empty_line_is_an_error_with_its_line_even_with_a_task(tiny_model, tmp_path, capsys):
    code, vectors, source = _embed_file(tiny_model, tmp_path, b"paris\n\nlondon\n",
                                        "--task", "search")
    assert code == 2 and vectors is None
    assert f"{source}:2 is empty or only whitespace" in capsys.readouterr().err
    jsonl = b'{"text": "paris"}\n{"text": "  "}\n'
    code, _, source = _embed_file(tiny_model, tmp_path, jsonl, "--task", "search", suffix=".jsonl")
    assert code == 2 and f"{source}:2 is empty" in capsys.readouterr().err


def test_cli_bad_utf8_names_file_line_and_column(tiny_model, tmp_path, capsys):
    code, vectors, source = _embed_file(tiny_model, tmp_path, b"paris\ncaf\xe9 au lait\n")
    assert code == 2 and vectors is None
    assert f"{source}:2: not valid UTF-8 (byte 0xe9 at column 4)" in capsys.readouterr().err


def test_cli_empty_input_is_an_error_unless_allowed(tiny_model, tmp_path, capsys):
    code, vectors, source = _embed_file(tiny_model, tmp_path, b"")
    assert code == 2 and vectors is None
    assert "holds no texts" in capsys.readouterr().err
    code, vectors, _ = _embed_file(tiny_model, tmp_path, b"", "--allow-empty-input", "--dim", "48")
    assert code == 0 and vectors.shape == (0, 48)


def test_overlong_texts_run_in_small_batches(tiny_model):
    """A long text is cut to max_length and padded with as few rows as the batch holds, not
    into a full batch of batch_size rows."""
    encoder = embed.load_encoder(tiny_model, batch_size=32, max_length=256,
                                 partitioner=_one_device())
    shapes = []
    forward = encoder._forward
    encoder._forward = lambda params, tokens, segments: (shapes.append(tokens.shape),
                                                         forward(params, tokens, segments))[1]
    long_text = " ".join(["code"] * 5000)
    alone = encoder.encode([long_text])
    assert shapes == [(1, 256)]
    shapes.clear()
    vectors = encoder.encode([long_text] + TEXTS)
    assert shapes == [(16, 256)]  # 9 texts: the next power of two rows, not 32
    np.testing.assert_allclose(vectors[0], alone[0], atol=1e-5)
    shapes.clear()
    encoder.batch_size = 4
    np.testing.assert_allclose(encoder.encode([long_text] + TEXTS), vectors, atol=1e-5)
    assert shapes == [(4, 256), (4, 16), (1, 16)]  # longest first; the short ones stay short
    assert encoder.truncated_count == 3
