"""`gemb precompile` prints per-device memory; TensorBoard events and console lines are written."""

import os
import subprocess
import sys

import pytest

from gemb import paths
from gemb.eval.hook import EvalHook
from gemb.train import metrics_writer


def run_precompile(*flags):
    env = dict(os.environ, PYTHONPATH=str(paths.REPO_ROOT))
    env.pop("XLA_FLAGS", None)  # precompile sets the fake device count itself
    result = subprocess.run([sys.executable, "-m", "gemb.train.precompile", *flags],
                            cwd=paths.REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_precompile_tiny_on_eight_fake_devices():
    out = run_precompile("--gin_file=gin/models/tiny.gin", "--gin_file=gin/partitioning/fsdp_tp.gin",
                         "--batch_size=16", "--query_length=16", "--document_length=32")
    assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 2} on 8 fake CPU devices" in out
    assert "peak_estimate" in out and "temporaries" in out


@pytest.mark.slow
def test_precompile_gemma3_1b_fsdp():
    out = run_precompile("--gin_file=gin/models/gemma3_1b.gin",
                         "--gin_file=gin/partitioning/fsdp.gin", "--batch_size=8",
                         "--query_length=32", "--document_length=64",
                         "--gin.encoder_config.remat_policy='full'")
    assert "gemma3_1b" in out and "per-device memory" in out


def test_tensorboard_scalars_and_text_round_trip(tmp_path):
    writer = metrics_writer.TensorBoardWriter(tmp_path)
    writer.scalars(3, {"train/loss": 1.5, "train/learning_rate": 1e-4})
    writer.text(0, "gin/operative_config", "    train.num_steps = 3")
    writer.close()
    scalars = metrics_writer.read_scalars(tmp_path)
    assert scalars["train/loss"] == [(3, 1.5)]


def test_console_line_has_loss_accuracy_rates_and_eta():
    lines = []
    logger = metrics_writer.ConsoleLogger(total_steps=10, every=5, print_fn=lines.append)
    logger.start(0)
    logger.add_tokens(1000)
    assert logger.maybe_log(4, {"loss": 1.0}) is None
    rates = logger.maybe_log(5, {"loss": 1.0, "accuracy": 0.5, "learning_rate": 1e-3})
    assert rates["tokens_per_second"] > 0
    for word in ("loss 1.0000", "acc 0.500", "steps/s", "tokens/s", "ETA"):
        assert word in lines[0]


def test_console_line_right_after_a_restarted_window_has_no_rates():
    lines = []
    logger = metrics_writer.ConsoleLogger(total_steps=10, every=1, print_fn=lines.append)
    logger.start(1)  # what the loop does after the first (compiling) step
    assert logger.maybe_log(1, {"loss": 2.0}) is None
    assert "loss 2.0000" in lines[0] and "steps/s" not in lines[0]
    logger.add_tokens(500)
    rates = logger.maybe_log(2, {"loss": 1.5})
    assert rates["steps_per_second"] > 0 and "ETA" in lines[1]


def test_eval_hook_schedule():
    hook = EvalHook(tasks=["sts:/nowhere/toy.tsv"], every=4)  # specs are read when scored
    assert hook.due(4, 10) and hook.due(10, 10) and not hook.due(5, 10)
    assert not EvalHook(tasks=[], every=4).due(4, 10)
