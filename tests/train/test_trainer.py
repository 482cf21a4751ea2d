"""The jitted train step: sharded = unsharded, gradient caching, NaN guard, microbatches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemb.models.config import TINY_ENCODER
from gemb.train import trainer

from helpers import build, partitioner_for, run_losses, synthetic_batches


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [None, 4], ids=["full_batch", "gradient_cache"])
def test_eight_device_mesh_matches_one_device(chunk):
    """(data 2, fsdp 2, tensor 2) on 8 fake CPU devices: the first 5 losses equal 1 device's."""
    assert jax.device_count() >= 8, "tests/conftest.py sets 8 fake CPU devices"
    batches = synthetic_batches(5)
    config = trainer.StepConfig(gradient_cache_chunk=chunk)
    single, _ = run_losses(partitioner_for((1, 1, 1), 1), batches, config, encoder=TINY_ENCODER)
    sharded, _ = run_losses(partitioner_for((2, 2, 2), 8), batches, config, encoder=TINY_ENCODER)
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5)
    assert single[-1] < single[0]  # it learns


def test_nan_loss_skips_the_update_and_names_the_step():
    partitioner = partitioner_for((1, 1, 1), 1)
    _, state, steps = build(partitioner)
    batch = synthetic_batches(1, batch_size=8)[0]
    head = state.params["encoder"]["head"]
    bad_params = jax.tree.map(lambda x: x, state.params)
    bad_params["encoder"]["head"] = jax.tree.map(lambda x: x * jnp.nan, head)
    bad = state.replace(params=bad_params)
    before = jax.tree.map(np.asarray, bad.params)
    new, metrics = steps.train(bad, batch)
    assert not bool(metrics["finite"])
    assert int(new.step) == 1  # the step (and the data) advance
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), new.params, before)


def test_microbatches_and_eval_step_run():
    partitioner = partitioner_for((2, 1, 1), 2)
    batches = synthetic_batches(2, batch_size=8)
    losses, state = run_losses(partitioner, batches, trainer.StepConfig(microbatches=2))
    assert np.isfinite(losses).all()
    _, _, steps = build(partitioner)
    metrics = steps.evaluate(state.params, batches[0])
    assert np.isfinite(float(metrics["loss"])) and 0 <= float(metrics["accuracy"]) <= 1


def test_indivisible_batch_is_a_clear_error():
    partitioner = partitioner_for((4, 1, 1), 4)
    _, state, steps = build(partitioner)
    batch = synthetic_batches(1, batch_size=6)[0]
    with pytest.raises(ValueError, match="cannot be split over the data axes"):
        steps.train(state, batch)


def test_example_major_layout_and_packed_rejection():
    features = synthetic_batches(1, batch_size=4, num_negatives=2)[0]
    assert features["negatives_tokens"].shape[:2] == (4, 2)
    assert "query_slot" not in features
    pairs = synthetic_batches(1, batch_size=4, num_negatives=0)[0]
    assert not any(key.startswith("negative") for key in pairs)
