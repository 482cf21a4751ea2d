"""Matryoshka prefixes: weighted per-dim losses, each prefix re-normalised, per-dim metrics.

The float64 reference equality of every option combination with Matryoshka dims is in
test_contrastive.py; these tests pin down what is specific to the prefixes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemb.losses import (
    ContrastiveLossConfig,
    contrastive_loss,
    embedding_prefix,
    matryoshka_contrastive_loss,
)

BATCH, DIM, NUM_NEGATIVES = 6, 16, 3


@pytest.fixture(autouse=True)
def float64_jax():
    """Same dtype and shapes as test_contrastive.py, so both share eagerly compiled ops."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def embeddings():
    rng = np.random.default_rng(0)
    return {
        "query": jnp.asarray(rng.normal(size=(BATCH, DIM)), jnp.float64),
        "positive": jnp.asarray(rng.normal(size=(BATCH, DIM)), jnp.float64),
        "negatives": jnp.asarray(rng.normal(size=(BATCH, NUM_NEGATIVES, DIM)), jnp.float64),
    }


@pytest.fixture
def features():
    return {
        "negative_mask": jnp.asarray(np.arange(NUM_NEGATIVES)[None] < np.array([3, 1, 0, 2, 3, 1])[:, None]),
        "query_hash": jnp.arange(BATCH, dtype=jnp.int32),
        "positive_hash": jnp.asarray([7, 8, 7, 9, 10, 11], jnp.int32),
    }


CONFIG = ContrastiveLossConfig(
    temperature=0.05, matryoshka_dims=(4, 8, 16), matryoshka_weights=(0.5, 1.0, 2.0)
)


def test_total_is_the_weighted_sum_of_per_dim_losses(embeddings, features):
    total, metrics = matryoshka_contrastive_loss(embeddings, features, config=CONFIG)
    per_dim = [float(metrics[f"loss/dim_{d}"]) for d in (4, 8, 16)]
    np.testing.assert_allclose(float(total), np.dot([0.5, 1.0, 2.0], per_dim), rtol=1e-6)
    assert float(metrics["loss"]) == pytest.approx(float(total))
    for dim in (4, 8, 16):
        single, _ = contrastive_loss(
            embeddings["query"][:, :dim],
            embeddings["positive"][:, :dim],
            embeddings["negatives"][..., :dim],
            features["negative_mask"],
            features["query_hash"],
            features["positive_hash"],
            config=CONFIG,
        )
        np.testing.assert_allclose(float(metrics[f"loss/dim_{dim}"]), float(single), rtol=1e-6)


def test_per_dim_metrics_are_reported(embeddings, features):
    _, metrics = matryoshka_contrastive_loss(embeddings, features, config=CONFIG)
    for name in ("loss", "accuracy", "positive_similarity", "hardest_negative_similarity"):
        for dim in (4, 8, 16):
            assert np.isfinite(float(metrics[f"{name}/dim_{dim}"]))
    # The unsuffixed metrics are those of the full embedding.
    assert float(metrics["accuracy"]) == float(metrics["accuracy/dim_16"])
    assert float(metrics["positive_similarity"]) == float(metrics["positive_similarity/dim_16"])
    assert float(metrics["temperature"]) == pytest.approx(0.05)


def test_each_prefix_is_renormalised(embeddings, features):
    """Unit vectors at full size, and vectors whose prefixes are rescaled, give one loss."""

    def unit(x):
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    normalised = {key: unit(value) for key, value in embeddings.items()}
    # Scale each block of coordinates by its own positive factor, per row: it changes every
    # prefix's norm (and the full cosine) but not the direction within the 4-dim prefix.
    scale = jnp.concatenate([jnp.full((4,), 3.0), jnp.full((12,), 0.5)])
    rescaled = {key: value * scale for key, value in normalised.items()}
    config = ContrastiveLossConfig(temperature=0.05, matryoshka_dims=(4,))
    a = matryoshka_contrastive_loss(normalised, features, config=config)[0]
    b = matryoshka_contrastive_loss(rescaled, features, config=config)[0]
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    # A prefix of a unit vector is not a unit vector: without re-normalising, the cosines of
    # the 4-dim prefix would be shrunk and the loss would change.
    manual_prefix = jnp.sum(normalised["query"][:, :4] * normalised["positive"][:, :4], -1).mean()
    _, metrics = matryoshka_contrastive_loss(normalised, features, config=config)
    assert float(metrics["positive_similarity/dim_4"]) != pytest.approx(float(manual_prefix), rel=1e-3)


def test_default_is_the_full_embedding_only(embeddings, features):
    total, metrics = matryoshka_contrastive_loss(embeddings, features, config=ContrastiveLossConfig())
    assert set(key for key in metrics if key.startswith("loss/")) == {f"loss/dim_{DIM}"}
    assert float(total) == pytest.approx(float(metrics[f"loss/dim_{DIM}"]), rel=1e-6)


def test_prefix_keeps_non_embedding_entries(embeddings):
    prefix = embedding_prefix(dict(embeddings, segment_mask=jnp.ones((BATCH,), bool)), 4)
    assert prefix["query"].shape == (BATCH, 4)
    assert prefix["negatives"].shape == (BATCH, NUM_NEGATIVES, 4)
    assert prefix["segment_mask"].shape == (BATCH,)


def test_dims_larger_than_the_embedding_are_an_error(embeddings, features):
    with pytest.raises(ValueError, match="only 16 dimensions"):
        matryoshka_contrastive_loss(
            embeddings, features, config=ContrastiveLossConfig(matryoshka_dims=(8, 32))
        )


def test_dims_are_a_set_of_widths_in_any_order(embeddings, features):
    """The model lists its widths in any order (EncoderConfig); the loss sorts them with their
    weights, so (16, 4) with weights (0, 1) is the same objective as (4, 16) with (1, 0)."""
    config = ContrastiveLossConfig(matryoshka_dims=(768, 1536, 512), matryoshka_weights=(1, 2, 3))
    assert config.matryoshka_dims == (512, 768, 1536)
    assert config.matryoshka_weights == (3.0, 1.0, 2.0)
    given = ContrastiveLossConfig(temperature=0.05, matryoshka_dims=(16, 4), matryoshka_weights=(0.0, 1.0))
    sorted_ = ContrastiveLossConfig(temperature=0.05, matryoshka_dims=(4, 16), matryoshka_weights=(1.0, 0.0))
    assert given == sorted_
    np.testing.assert_array_equal(
        matryoshka_contrastive_loss(embeddings, features, config=given)[0],
        matryoshka_contrastive_loss(embeddings, features, config=sorted_)[0])
    with pytest.raises(ValueError, match="repeat a width"):
        ContrastiveLossConfig(matryoshka_dims=(512, 768, 512))


def test_gradients_reach_every_prefix(embeddings, features):
    """With weight only on the 4-dim prefix, the tail coordinates get no gradient."""
    config = ContrastiveLossConfig(temperature=0.05, matryoshka_dims=(4, 16), matryoshka_weights=(1.0, 0.0))
    def loss(embeddings):
        return matryoshka_contrastive_loss(embeddings, features, config=config)[0]

    grads = jax.jit(jax.grad(loss))(embeddings)
    assert float(jnp.abs(grads["query"][:, :4]).max()) > 0
    assert float(jnp.abs(grads["query"][:, 4:]).max()) == 0
