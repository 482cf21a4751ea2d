"""A prepared (streamed) task in `gemb train` as 2 JAX processes: each process opens only its
own shards, the two processes' shards are disjoint and cover the split, and the per-step losses
equal one process reading the same files with the same two readers (the same global batches)."""

import ast
import re

import numpy as np
import pytest

import mp_harness as harness
from gemb.data import prepared

pytestmark = pytest.mark.slow

NUM_STEPS = 8
NUM_SHARDS = 6


def _command(model_dir, folder):
    return harness.train_command(
        model_dir, f"--gin.train.num_steps={NUM_STEPS}", "--gin.CheckpointConfig.save_every=4",
        "--log_level=info", "--gin.train.data=@SeqioData()",
        f"--gin.SeqioData.prepared={{'pairs': '{folder}'}}", "--gin.SeqioData.rates={'pairs': 1.0}",
        "--gin.SeqioData.batch_size=16", "--gin.SeqioData.features=@FeatureConverterConfig()",
        "--gin.FeatureConverterConfig.num_negatives=1",
        "--gin.SeqioData.stream_order=@StreamOrder()", "--gin.StreamOrder.num_readers=2",
        "--gin.StreamOrder.shuffle_window=64")


def _opened_shards(output):
    match = re.search(r"reads shards (\[[0-9, ]*\]) of (\d+)", output)
    assert match, output[-3000:]
    return ast.literal_eval(match.group(1)), int(match.group(2))


def test_two_processes_stream_their_own_shards_and_equal_one_process(tmp_path):
    folder = tmp_path / "pairs"
    prepared.write_synthetic_task(folder, 500, NUM_SHARDS, task="pairs", num_negatives=1,
                                  vocab_size=500, max_length=10)
    two = harness.gemb(_command(tmp_path / "two", folder), 2)
    one = harness.gemb(_command(tmp_path / "one", folder), 1)
    shards = [_opened_shards(result.output) for result in two]
    assert [count for _, count in shards] == [NUM_SHARDS, NUM_SHARDS]
    assert set(shards[0][0]).isdisjoint(shards[1][0])
    assert sorted(shards[0][0] + shards[1][0]) == list(range(NUM_SHARDS))
    assert _opened_shards(one[0].output)[0] == list(range(NUM_SHARDS))
    losses_two = harness.logged_losses(tmp_path / "two")
    losses_one = harness.logged_losses(tmp_path / "one")
    assert sorted(losses_two) == sorted(losses_one) == list(range(1, NUM_STEPS + 1))
    np.testing.assert_allclose([losses_two[s] for s in range(1, NUM_STEPS + 1)],
                               [losses_one[s] for s in range(1, NUM_STEPS + 1)], atol=1e-5)
