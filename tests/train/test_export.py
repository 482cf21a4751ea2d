"""A run directory carries its tokenizer, export=True writes a usable model folder, and the eval
hook scores gemb.eval tasks on the params being trained, into TensorBoard."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from gemb import embed
from gemb.checkpoints import convert, model_dir as model_dir_lib
from gemb.eval.hook import EvalHook
from gemb.train import checkpointing, metrics_writer, run
from gemb.train.data import SyntheticData
from tiny_checkpoints import write_tiny_hf_checkpoint, write_word_level_tokenizer

from helpers import LOSS, OPTIMIZER, partitioner_for


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_export_holds_the_final_params_and_the_tokenizer_and_evals_reach_tensorboard(tmp_path):
    source = tmp_path / "hf"
    source.mkdir()
    write_tiny_hf_checkpoint(source)
    write_word_level_tokenizer(source)
    folder = convert.convert(str(source), tmp_path / "model", head_dims=(96,),
                             matryoshka_dims=(96, 48))
    encoder, _ = model_dir_lib.read_model_config(folder)
    sts_file = tmp_path / "toy_sts.tsv"
    sts_file.write_text("sentence1\tsentence2\tscore\nthe capital\tthe capital of france\t5\n"
                        "python code\tparis is\t0\na list\ta list of code\t4\n")
    hook = EvalHook(tasks=[f"sts:{sts_file}?name=toy"], at_start=True, at_end=True)
    run_dir = tmp_path / "run"
    summary = run.train(
        model_dir=str(run_dir), encoder=encoder,
        data=SyntheticData(batch_size=8, vocab_size=encoder.transformer.vocab_size),
        num_steps=2, loss=LOSS, optimizer=OPTIMIZER, init_from=str(folder), export=True,
        eval_hook=hook, partitioner=lambda: partitioner_for((1, 1, 1), 1))
    assert set(summary["eval"]) == {0, 2} and "toy/main_score" in summary["eval"][2]
    logged = metrics_writer.read_scalars(run_dir / "train")["eval/toy/main_score"]
    assert [step for step, _ in logged] == [0, 2]
    assert logged[-1][1] == pytest.approx(summary["eval"][2]["toy/main_score"])
    assert (run_dir / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    export = run_dir / "export"
    assert (export / "tokenizer.json").is_file()
    exported = _flat(model_dir_lib.load_params(export))
    final = _flat(checkpointing.load_init_params(
        run_dir, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          model_dir_lib.load_params(folder)), target_config=encoder))
    initial = _flat(model_dir_lib.load_params(folder))
    assert set(exported) == set(final)
    assert any(not np.array_equal(final[n], initial[n]) for n in final)  # training changed them
    for name in final:
        np.testing.assert_array_equal(exported[name], final[name], err_msg=name)
    vectors = embed.load_encoder(export).encode(["the capital of france"])
    assert vectors.shape == (1, 96)
