"""The loss and the gradient-cached step on a batch sharded over 8 fake CPU devices.

Under jit the batch is one global array, so in-batch negatives span every device without
hand-written all-gathers; these tests check that the numbers do not depend on the sharding and
that a query really meets the documents held by other devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemb.losses import (
    ContrastiveLossConfig,
    full_batch_value_and_grad,
    gradient_cached_value_and_grad,
    matryoshka_contrastive_loss,
)
from test_contrastive import reference_nce
from test_gradcache import (
    INPUT_DIM,
    MlpEmbedder,
    assert_trees_close,
    contrastive_loss_fn,
    mlp_batch,
    mlp_embed_fn,
)

NUM_DEVICES = 8
BATCH, DIM, NUM_NEGATIVES = 16, 16, 2


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < NUM_DEVICES:
        pytest.skip(f"needs {NUM_DEVICES} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    return Mesh(np.array(jax.devices()[:NUM_DEVICES]), ("data",))


def shard_batch(tree, mesh):
    """Every leaf split along its leading (batch) axis over the 'data' mesh axis."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec("data")))


def on_one_device(tree):
    return jax.device_put(tree, jax.devices()[0])


def random_embeddings(seed):
    rng = np.random.default_rng(seed)
    embeddings = {
        "query": rng.normal(size=(BATCH, DIM)).astype(np.float32),
        "positive": rng.normal(size=(BATCH, DIM)).astype(np.float32),
        "negatives": rng.normal(size=(BATCH, NUM_NEGATIVES, DIM)).astype(np.float32),
    }
    features = {
        "negative_mask": rng.random((BATCH, NUM_NEGATIVES)) > 0.3,
        "query_hash": np.arange(BATCH, dtype=np.int32),
        "positive_hash": np.arange(BATCH, 2 * BATCH, dtype=np.int32),
        "negative_hash": rng.integers(100, 200, (BATCH, NUM_NEGATIVES), dtype=np.int32),
    }
    # Duplicates across devices: rows 1 and 14 live on devices 0 and 7.
    features["positive_hash"][14] = features["positive_hash"][1]
    features["query_hash"][12] = features["query_hash"][3]
    return embeddings, features


CONFIG = ContrastiveLossConfig(
    temperature=0.05,
    use_other_hard_negatives=True,
    symmetric=True,
    matryoshka_dims=(8, 16),
)


def loss_and_embedding_grads(embeddings, features):
    def loss(embeddings):
        return matryoshka_contrastive_loss(embeddings, features, config=CONFIG)

    return jax.value_and_grad(loss, has_aux=True)(embeddings)


def test_sharded_loss_and_grads_equal_single_device(mesh):
    embeddings, features = random_embeddings(seed=0)
    step = jax.jit(loss_and_embedding_grads)
    (loss, metrics), grads = step(on_one_device(embeddings), on_one_device(features))
    sharded_inputs = shard_batch((embeddings, features), mesh)
    assert len(sharded_inputs[0]["query"].sharding.device_set) == NUM_DEVICES
    (sharded_loss, sharded_metrics), sharded_grads = step(*sharded_inputs)
    np.testing.assert_allclose(float(sharded_loss), float(loss), rtol=1e-6)
    assert_trees_close(sharded_metrics, metrics, rtol=1e-6)
    assert_trees_close(sharded_grads, grads, rtol=1e-5)  # float32 sums in another order


def test_negatives_are_global_across_devices(mesh):
    """Query 0 (device 0) is nearly identical to positive 15 (device 7), a wrong document.

    With global negatives p_15 dominates q_0's row: the loss is large and q_0's top-1 is wrong.
    A per-device loss would never show q_0 that document. Row 2's positive text also appears
    at row 13 (device 6): only a global duplicate mask removes it.
    """
    rng = np.random.default_rng(1)
    query = rng.normal(size=(BATCH, DIM))
    positive = query + 0.3 * rng.normal(size=(BATCH, DIM))  # every query is near its positive
    query[0] = positive[15] + 1e-3 * rng.normal(size=DIM)
    query_hash = np.arange(BATCH, dtype=np.int32)
    positive_hash = np.arange(BATCH, dtype=np.int32) + 100
    positive_hash[13] = positive_hash[2]
    embeddings = {"query": query.astype(np.float32), "positive": positive.astype(np.float32)}
    features = {"query_hash": query_hash, "positive_hash": positive_hash}
    config = ContrastiveLossConfig(temperature=0.05)

    loss, metrics = jax.jit(
        lambda e, f: matryoshka_contrastive_loss(e, f, config=config)
    )(*shard_batch((embeddings, features), mesh))

    global_reference = reference_nce(
        query, positive, query_hash=query_hash, positive_hash=positive_hash, temperature=0.05
    )
    rows_per_device = BATCH // NUM_DEVICES
    per_device_reference = np.mean([
        reference_nce(
            query[block], positive[block], query_hash=query_hash[block],
            positive_hash=positive_hash[block], temperature=0.05,
        )
        for block in np.split(np.arange(BATCH), BATCH // rows_per_device)
    ])
    np.testing.assert_allclose(float(loss), global_reference, rtol=1e-5)
    assert global_reference - per_device_reference > 0.5
    assert float(metrics["accuracy"]) <= (BATCH - 1) / BATCH  # q_0 picks p_15


def test_sharded_gradient_cache_equals_single_device_full_batch(mesh):
    model = MlpEmbedder()
    params = {"encoder": model.init(jax.random.key(0), jnp.zeros((1, INPUT_DIM)))["params"]}
    batch = mlp_batch(seed=2, num_negatives=2)
    config = ContrastiveLossConfig(
        temperature=0.05, use_other_hard_negatives=True, matryoshka_dims=(8, 16)
    )
    embed_fn, loss_fn = mlp_embed_fn(model), contrastive_loss_fn(config)

    (loss, _), grads = jax.jit(full_batch_value_and_grad(embed_fn, loss_fn))(
        on_one_device(params), on_one_device(batch)
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    cached_step = jax.jit(
        gradient_cached_value_and_grad(embed_fn, loss_fn, chunk_size=8),
        in_shardings=(replicated, NamedSharding(mesh, PartitionSpec("data"))),
        out_shardings=((replicated, replicated), replicated),
    )
    (sharded_loss, _), sharded_grads = cached_step(params, batch)
    np.testing.assert_allclose(float(sharded_loss), float(loss), rtol=1e-6)
    assert_trees_close(sharded_grads, grads)
