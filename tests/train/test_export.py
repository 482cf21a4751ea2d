"""A run directory carries its tokenizer, and export=True writes a usable model folder."""

import jax
import numpy as np
from flax import traverse_util

from gemb import embed
from gemb.checkpoints import convert, model_dir as model_dir_lib
from gemb.train import checkpointing, main as train_main
from gemb.train.data import SyntheticData
from tiny_checkpoints import write_tiny_hf_checkpoint, write_word_level_tokenizer

from helpers import LOSS, OPTIMIZER, partitioner_for


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_export_holds_the_final_params_and_the_tokenizer(tmp_path):
    source = tmp_path / "hf"
    source.mkdir()
    write_tiny_hf_checkpoint(source)
    write_word_level_tokenizer(source)
    folder = convert.convert(str(source), tmp_path / "model", head_dims=(96,),
                             matryoshka_dims=(96, 48))
    encoder, _ = model_dir_lib.read_model_config(folder)
    run = tmp_path / "run"
    train_main.train(model_dir=str(run), encoder=encoder,
                     data=SyntheticData(batch_size=8, vocab_size=encoder.transformer.vocab_size),
                     num_steps=2, loss=LOSS, optimizer=OPTIMIZER, init_from=str(folder),
                     export=True, partitioner=lambda: partitioner_for((1, 1, 1), 1))
    assert (run / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    export = run / "export"
    assert (export / "tokenizer.json").is_file()
    exported = _flat(model_dir_lib.load_params(export))
    final = _flat(checkpointing.load_init_params(
        run, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          model_dir_lib.load_params(folder)), target_config=encoder))
    initial = _flat(model_dir_lib.load_params(folder))
    assert set(exported) == set(final)
    assert any(not np.array_equal(final[n], initial[n]) for n in final)  # training changed them
    for name in final:
        np.testing.assert_array_equal(exported[name], final[name], err_msg=name)
    vectors = embed.load_encoder(export).encode(["the capital of france"])
    assert vectors.shape == (1, 96)
