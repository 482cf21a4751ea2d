"""The jitted train step: sharded = unsharded, gradient caching, NaN guard, microbatches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemb.train import trainer

from helpers import build, partitioner_for, run_losses, synthetic_batches


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [None, 4], ids=["full_batch", "gradient_cache"])
def test_eight_device_mesh_matches_one_device(chunk):
    """(data 2, fsdp 2, tensor 2) on 8 fake CPU devices: the first 5 losses equal 1 device's."""
    assert jax.device_count() >= 8, "tests/conftest.py sets 8 fake CPU devices"
    batches = synthetic_batches(5)
    config = trainer.StepConfig(gradient_cache_chunk=chunk)
    single, single_state = run_losses(partitioner_for((1, 1, 1), 1), batches, config)
    sharded, sharded_state = run_losses(partitioner_for((2, 2, 2), 8), batches, config)
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5)
    # The params after 5 updates agree too (the updates are not no-ops: they moved).
    moved = []
    for a, b in zip(jax.tree.leaves(sharded_state.params), jax.tree.leaves(single_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    _, fresh, _ = build(partitioner_for((1, 1, 1), 1))
    moved = [not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(single_state.params), jax.tree.leaves(fresh.params))]
    assert any(moved)


def test_nan_loss_skips_the_update_and_names_the_step():
    partitioner = partitioner_for((1, 1, 1), 1)
    _, state, steps = build(partitioner)
    batch = synthetic_batches(1, batch_size=8)[0]
    head = state.params["encoder"]["head"]
    bad_params = jax.tree.map(lambda x: x, state.params)
    bad_params["encoder"]["head"] = jax.tree.map(lambda x: x * jnp.nan, head)
    bad = state.replace(params=bad_params)
    before = jax.tree.map(np.asarray, bad.params)
    new, metrics = steps.train_step(bad, batch)
    assert not bool(metrics["finite"])
    assert int(new.step) == 1  # the step (and the data) advance
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), new.params, before)


def test_microbatches_and_eval_step_run():
    partitioner = partitioner_for((2, 1, 1), 2)
    batches = synthetic_batches(2, batch_size=8)
    losses, state = run_losses(partitioner, batches, trainer.StepConfig(microbatches=2))
    assert np.isfinite(losses).all()
    _, _, steps = build(partitioner)
    metrics = steps.eval_step(state.params, batches[0])
    assert np.isfinite(float(metrics["loss"])) and 0 <= float(metrics["accuracy"]) <= 1


def test_indivisible_batch_is_a_clear_error():
    partitioner = partitioner_for((4, 1, 1), 4)
    _, state, steps = build(partitioner)
    batch = synthetic_batches(1, batch_size=6)[0]
    with pytest.raises(ValueError, match="cannot be split over the data axes"):
        steps.train_step(state, batch)


def test_padded_and_packed_layouts_and_batch_size_checks():
    """The converter's padded layout is example-major ([B, K, L] negatives, no slots); its
    packed layout has slots; both train; the batch size checks name what does not divide
    (packed batches take gradient caching and microbatches too: test_packed_step_splits.py)."""
    padded = synthetic_batches(1, batch_size=4, num_negatives=2)[0]
    assert padded["negatives_tokens"].shape[:2] == (4, 2)
    assert "query_slot" not in padded and "query_segment_mask" not in padded
    pairs = synthetic_batches(1, batch_size=4, num_negatives=0)[0]
    assert not any(key.startswith("negative") for key in pairs)
    packed = synthetic_batches(2, batch_size=8, num_negatives=1, pack=True)
    assert packed[0]["query_slot"].shape == (8,) and packed[0]["negative_slot"].shape == (8, 1)
    assert packed[0]["query_segment_mask"].sum() == 8  # every query has a (row, segment) slot
    losses, _ = run_losses(partitioner_for((1, 1, 1), 1), packed)
    assert np.isfinite(losses).all()
    partitioner = partitioner_for((2, 1, 1), 2)
    trainer.check_batch_size(16, trainer.StepConfig(gradient_cache_chunk=4, microbatches=2),
                             partitioner)
    with pytest.raises(ValueError, match=r"a microbatch of 8 examples \(data.batch_size=16 / "
                                         r"step.microbatches=2\) is not a multiple of "
                                         r"step.gradient_cache_chunk=16"):
        trainer.check_batch_size(16, trainer.StepConfig(gradient_cache_chunk=16, microbatches=2),
                                 partitioner)
    with pytest.raises(ValueError, match=r"data.batch_size=12 is not a multiple of "
                                         r"step.gradient_cache_chunk=8"):
        trainer.check_batch_size(12, trainer.StepConfig(gradient_cache_chunk=8), partitioner)
    with pytest.raises(ValueError, match="cannot be split over 2 data shards; use a batch size "
                                         "that is a multiple of 8"):
        trainer.check_batch_size(12, trainer.StepConfig(microbatches=4), partitioner)
    # Packed rows: each pack group's rows on a process are a multiple of its data-parallel
    # devices x the gradient-cache chunks of a microbatch.
    assert trainer.packed_row_multiple(trainer.StepConfig(gradient_cache_chunk=4, microbatches=2),
                                       32, 2) == 2 * 4
    assert trainer.packed_row_multiple(trainer.StepConfig(), 32, 2) == 2


def test_packed_step_equals_padded_step():
    """One example per row or several per row: the same examples give the same loss."""
    partitioner = partitioner_for((1, 1, 1), 1)
    padded = synthetic_batches(1, batch_size=8, num_negatives=1)[0]
    packed = synthetic_batches(1, batch_size=8, num_negatives=1, pack=True)[0]
    from gemb.data import feature_converter

    assert (feature_converter.examples_in_features(padded)
            == feature_converter.examples_in_features(packed))
    padded_loss, _ = run_losses(partitioner, [padded])
    packed_loss, _ = run_losses(partitioner, [packed])
    np.testing.assert_allclose(packed_loss, padded_loss, rtol=1e-5)
