"""`gemb convert` -> model folder -> load: weights, seeded head, tokenizer, bad folders."""

import json
import shutil

import jax
import numpy as np
import pytest

from gemb.checkpoints import convert, import_hf, layout, model_dir
from tiny_checkpoints import write_tiny_hf_checkpoint, write_word_level_tokenizer


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_hf")
    write_tiny_hf_checkpoint(folder)
    write_word_level_tokenizer(folder)
    return folder


def test_convert_writes_params_config_and_tokenizer(tiny_hf_dir, tmp_path):
    out = tmp_path / "model"
    assert convert.main(["--from", str(tiny_hf_dir), "--out", str(out), "--head-dims", "96",
                         "--matryoshka-dims", "96,48", "--seed", "3"]) == 0
    config, record = model_dir.read_model_config(out)
    assert config.transformer.name == "tiny" and config.head_dims == (96,)
    assert record["source_format"] == "hf" and record["head_init_seed"] == 3
    assert (out / "tokenizer.json").is_file()
    params = model_dir.load_params(out)
    _, upstream = import_hf.load_hf(tiny_hf_dir)
    expected = layout.to_model_layout(upstream, config.transformer)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params["transformer"], expected)
    assert params["head"]["dense_0"].shape == (64, 96)


def test_head_is_seeded(tiny_hf_dir, tmp_path):
    heads = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        convert.convert(str(tiny_hf_dir), tmp_path / name, head_dims=(96,), matryoshka_dims=(96,), seed=seed)
        heads[name] = model_dir.load_params(tmp_path / name)["head"]["dense_0"]
    np.testing.assert_array_equal(heads["a"], heads["b"])
    assert np.abs(heads["a"] - heads["c"]).max() > 0.01


def test_bad_model_folders_are_named(tiny_hf_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a gemb model folder"):
        model_dir.read_model_config(tmp_path)
    out = convert.convert(str(tiny_hf_dir), tmp_path / "m", head_dims=(96,), matryoshka_dims=(96,))
    with pytest.raises(FileExistsError, match="already exists"):
        convert.convert(str(tiny_hf_dir), out, head_dims=(96,), matryoshka_dims=(96,))
    # A damaged checkpoint: every array file emptied.
    for file in (out / "params").rglob("*"):
        if file.is_file() and file.stat().st_size > 1000:
            file.write_bytes(b"")
    with pytest.raises(ValueError, match="Cannot restore parameters .* convert it again"):
        model_dir.load_params(out)
    shutil.rmtree(out / "params")
    with pytest.raises(FileNotFoundError, match="params is missing"):
        model_dir.load_params(out)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        convert.convert(str(tmp_path / "absent"), tmp_path / "x")


def test_config_round_trip(tiny_hf_dir, tmp_path):
    out = convert.convert(str(tiny_hf_dir), tmp_path / "m", head_dims=(96, 32), matryoshka_dims=(32, 16))
    config, _ = model_dir.read_model_config(out)
    assert config.head_dims == (96, 32) and config.matryoshka_dims == (32, 16)
    record = json.loads((out / model_dir.CONFIG_FILENAME).read_text())
    assert record["encoder"]["transformer"]["attention_pattern"][-1] == "global"
