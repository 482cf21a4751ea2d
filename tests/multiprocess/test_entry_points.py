"""Every entry point as one job of 2 JAX processes with the params sharded over both (fsdp),
with every path on gs:// (a real GCS-compatible server on 127.0.0.1, tests/gcs_emulator.py):
train (init_from a model folder, stop, resume, eval hook, export) -> soup -> eval -> embed ->
export. Each result is checked against what one process computes from the same files."""

import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

import mp_harness as harness
from tiny_checkpoints import write_tiny_model_folder

pytestmark = pytest.mark.slow

TEXTS = ["what is the capital of france", "paris", "the python function returns a list of code",
         "a", "query text", "the capital of france is paris", "search result", "code", "list",
         "the text of a sentence"]


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _params_of(folder):
    from gemb.checkpoints import model_dir as model_dir_lib

    return _flat(model_dir_lib.load_params(folder))


def _checkpoint_params(run_dir, step, like):
    from gemb.train import checkpointing

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
    return _flat(checkpointing.load_init_params(run_dir, abstract, step=step))


def test_train_soup_eval_embed_export_across_two_processes_on_gcs(tmp_path_factory, tmp_path,
                                                                  gcs_dir):
    from gcs_emulator import upload_folder
    from gemb import paths
    from gemb.checkpoints import model_dir as model_dir_lib
    from gemb.embed import load_encoder
    from gemb.eval import cli as eval_cli
    from gemb.train import metrics_writer

    local_folder = write_tiny_model_folder(tmp_path_factory, head_dims=(96,),
                                           matryoshka_dims=(24, 48, 96))
    folder = gcs_dir / "init"
    upload_folder(local_folder, folder)
    sts = tmp_path / "toy_sts.tsv"
    sts.write_text("sentence1\tsentence2\tscore\nthe capital\tthe capital of france\t5\n"
                   "python code\tparis is\t0\na list\ta list of code\t4\nsearch\tquery text\t1\n")
    task = f"sts:{sts}?name=toy"
    run_dir = gcs_dir / "run"
    train = ["train", "--gin_file=gin/runs/tiny_synthetic.gin", "--gin_file=gin/partitioning/fsdp.gin",
             f"--gin.MODEL_DIR='{run_dir}'", f"--gin.train.init_from='{folder}'",
             "--gin.train.num_steps=6", "--gin.CheckpointConfig.save_every=3",
             "--gin.train.export=True", "--gin.train.eval_hook=@EvalHook()",
             f"--gin.EvalHook.tasks=['{task}']", "--gin.EvalHook.at_start=False",
             "--gin.EvalHook.at_end=True"]
    first = harness.gemb([*train, "--gin.train.stop_after=3"], 2)
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in first[0].output
    resumed = harness.gemb(train, 2)
    assert "Resumed" in resumed[0].output and "from step 3." in resumed[0].output
    assert "eval step 6: toy/" in resumed[0].output
    # The export holds the final checkpoint's params (written shard by shard by both).
    initial = model_dir_lib.load_params(folder)
    final = _checkpoint_params(run_dir, 6, initial)
    exported = _params_of(run_dir / "export")
    assert set(exported) == set(final)
    for name in final:
        np.testing.assert_array_equal(exported[name], final[name], err_msg=name)
    losses = metrics_writer.read_scalars(run_dir / "train")["train/loss"]
    assert [step for step, _ in losses] == list(range(1, 7))  # steps 4..6 after the resume
    assert len((run_dir / "train_metrics.jsonl").read_text().splitlines()) == 6

    # Soup of steps 3 and 6: the average, in both processes' shards.
    soup = gcs_dir / "soup"
    harness.gemb(["soup", "--model", f"{run_dir}@3", "--model", f"{run_dir}@6",
                  "--out", str(soup)], 2)
    at_3 = _checkpoint_params(run_dir, 3, initial)
    souped = _params_of(soup)
    for name in final:
        np.testing.assert_allclose(souped[name], (at_3[name] + final[name]) / 2, atol=1e-6,
                                   err_msg=name)
    assert (soup / "tokenizer.json").is_file()

    # gemb eval: 2 processes score what one process scores (texts cut to 6 tokens in both).
    harness.gemb(["eval", "--model", str(soup), "--tasks", task, "--max-length", "6",
                  "--output", str(gcs_dir / "eval2")], 2)
    assert eval_cli.main(["--model", str(soup), "--tasks", task, "--max-length", "6",
                          "--output", str(tmp_path / "eval1")]) == 0
    two = json.loads((gcs_dir / "eval2" / "toy.json").read_text())
    one = json.loads((tmp_path / "eval1" / "toy.json").read_text())
    assert two["main_score"] == pytest.approx(one["main_score"], abs=1e-5)

    # gemb embed: each process embeds its block of every batch; process 0 writes all rows.
    texts = gcs_dir / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    harness.gemb(["embed", "--model", str(soup), "--input", str(texts), "--output",
                  str(gcs_dir / "two.npy"), "--batch-size", "8"], 2)
    expected = load_encoder(str(soup), batch_size=8).encode(TEXTS)
    with (gcs_dir / "two.npy").open("rb") as handle:
        np.testing.assert_allclose(np.load(handle), expected, atol=1e-5)

    # gemb export: process 0 writes the sentence-transformers folder, the other waits.
    harness.gemb(["export", "--model", str(soup), "--out", str(gcs_dir / "st")], 2)
    assert (gcs_dir / "st" / "modules.json").is_file()

    # Every file went to the server: no process made a local "gs:" folder (pathlib's reading
    # of "gs://bucket/..."), neither in the working folder nor beside the test's files.
    for where in (os.getcwd(), str(paths.REPO_ROOT), str(tmp_path)):
        assert not os.path.exists(os.path.join(where, "gs:")), where
