"""Packed batches cut into gradient-cache chunks and microbatches give exactly the padded step.

The same examples go through the train step padded (one example per row) and packed (several
per row, read back by slot); gradient caching chunks each role's encoder rows, microbatches are
the strided groups of examples with each group packed into rows of its own (FeatureConverter
pack_groups). Gradients and one optimiser step's params must agree to float rounding.
"""

import jax
import numpy as np
import pytest

from gemb.data import feature_converter as fc
from gemb.data.feature_converter import (FeatureConverter, FeatureConverterConfig, RoleTokens,
                                         TokenBatch)
from gemb.train import optimizers, trainer

from helpers import OPTIMIZER, build, partitioner_for

RTOL = 1e-5
COMMON = dict(query_length=24, document_length=32, length_buckets=())


def token_batch(batch_size, num_negatives, seed=0):
    """Short texts of varied lengths (2..9 ids): rows of 24 / 32 pack several of them."""
    rng = np.random.default_rng(seed)

    def texts(count):
        return [rng.integers(3, 500, int(rng.integers(2, 10))).tolist() for _ in range(count)]

    used = rng.integers(0, num_negatives + 1, batch_size).astype(np.int32)
    negatives = texts(batch_size * num_negatives)
    for b in range(batch_size):
        for k in range(used[b], num_negatives):
            negatives[b * num_negatives + k] = []
    return TokenBatch(RoleTokens.from_lists(texts(batch_size)),
                      RoleTokens.from_lists(texts(batch_size)),
                      RoleTokens.from_lists(negatives), used)


def padded_and_packed(batch, row_multiple=1, pack_groups=1):
    padded = FeatureConverter(FeatureConverterConfig(**COMMON)).convert(batch)
    packed = FeatureConverter(FeatureConverterConfig(pack=True, segments_per_row=4, **COMMON),
                              row_multiple=row_multiple, pack_groups=pack_groups).convert(batch)
    assert fc.examples_in_features(padded) == fc.examples_in_features(packed)
    return padded, packed


def assert_trees_close(actual, expected, rtol=RTOL):
    """Elementwise rtol with an absolute floor of rtol x the leaf's largest entry (a gradient
    entry that is a near-cancelling sum keeps the absolute error of its largest terms)."""
    def check(path, a, e):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * float(np.abs(e).max()),
                                   err_msg=jax.tree_util.keystr(path))

    jax.tree_util.tree_map_with_path(check, actual, expected)


def loss_grads_and_step(partitioner, step_config, batch):
    """(loss, grads, params after one train step) of a fresh SMALL state on `batch`: the pure
    train step and the gradient it applies, in one program (one compile instead of two)."""
    _, state, steps = build(partitioner, step_config)
    train_step = trainer.make_train_step(steps.model, optimizers.make_optimizer(OPTIMIZER, 10),
                                         step_config)
    value_and_grad = trainer.make_value_and_grad(steps.model, step_config)

    def step_and_grads(state, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, _), grads = value_and_grad(state.params, batch, rng)
        new_state, metrics = train_step(state, batch)
        return loss, metrics["loss"], grads, new_state.params

    with partitioner.activation_context():
        loss, step_loss, grads, params = jax.jit(step_and_grads)(state, steps.place(batch))
    np.testing.assert_allclose(float(step_loss), float(loss), rtol=1e-6)
    return float(loss), jax.tree.map(np.asarray, grads), jax.tree.map(np.asarray, params)


def assert_same_step(actual, expected):
    loss, grads, params = actual
    expected_loss, expected_grads, expected_params = expected
    np.testing.assert_allclose(loss, expected_loss, rtol=RTOL)
    assert_trees_close(grads, expected_grads)
    assert_trees_close(params, expected_params)
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads)) > 0


@pytest.mark.slow
@pytest.mark.parametrize("ici, num_devices", [((1, 1, 1), 1), ((2, 2, 2), 8)],
                         ids=["one_device", "eight_devices"])
def test_packed_gradient_cache_equals_padded_full_batch(ici, num_devices):
    partitioner = partitioner_for(ici, num_devices)
    cached = trainer.StepConfig(gradient_cache_chunk=4)
    batch_size = 16
    row_multiple = trainer.packed_row_multiple(cached, batch_size, partitioner.data_parallel_size)
    padded, packed = padded_and_packed(token_batch(batch_size, 2), row_multiple)
    for role in ("query", "positive", "negatives"):
        rows = packed[f"{role}_tokens"].shape[0]
        assert rows % row_multiple == 0
    assert packed["query_segment_mask"].sum(axis=1).max() > 1  # rows do hold several examples
    reference = loss_grads_and_step(partitioner, trainer.StepConfig(), padded)
    assert_same_step(loss_grads_and_step(partitioner, cached, packed), reference)


@pytest.mark.slow
def test_packed_rows_that_do_not_split_into_chunks_are_a_clear_error():
    partitioner = partitioner_for((1, 1, 1), 1)
    _, packed = padded_and_packed(token_batch(8, 0))  # row_multiple 1: 3 query rows
    rows = packed["query_tokens"].shape[0]
    assert rows % 4, rows
    _, state, steps = build(partitioner, trainer.StepConfig(gradient_cache_chunk=2))
    with pytest.raises(ValueError, match=r"cannot be split into 4 gradient-cache chunks.*"
                                         r"row_multiple"):
        steps.train_step(state, packed)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [None, 2], ids=["whole_microbatch", "gradient_cache"])
def test_packed_microbatches_equal_padded_microbatches(chunk):
    """Microbatch m is the examples m, m + 2, ... in both layouts; packed, its rows hold
    exactly those (pack_groups), so both give the same losses and gradients."""
    partitioner = partitioner_for((1, 1, 1), 1)
    batch_size, microbatches = 32, 2
    step_config = trainer.StepConfig(microbatches=microbatches, gradient_cache_chunk=chunk)
    row_multiple = trainer.packed_row_multiple(step_config, batch_size,
                                               partitioner.data_parallel_size)
    padded, packed = padded_and_packed(token_batch(batch_size, 1, seed=3), row_multiple,
                                       pack_groups=microbatches)
    fc.check_pack_groups(packed, microbatches)
    reference = loss_grads_and_step(partitioner, trainer.StepConfig(microbatches=microbatches),
                                    padded)
    assert_same_step(loss_grads_and_step(partitioner, step_config, packed), reference)


def test_packed_microbatches_of_an_ungrouped_batch_are_a_clear_error():
    partitioner = partitioner_for((1, 1, 1), 1)
    # Packed as one group (rows of both microbatches mixed), in an even number of rows.
    _, ungrouped = padded_and_packed(token_batch(16, 1, seed=1), row_multiple=2)
    _, _, steps = build(partitioner, trainer.StepConfig(microbatches=2))
    with pytest.raises(ValueError, match=r"example \d+'s \w+ lies in row \d+, which microbatch "
                                         r"\d holds, not its own microbatch \d of 2.*"
                                         r"FeatureConverter\(pack_groups=2\)"):
        steps.place(ungrouped)
