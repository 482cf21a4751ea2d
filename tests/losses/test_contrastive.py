"""gemb.losses.contrastive against a float64 NumPy reference of the docs/recipe.md formula.

The reference below builds every query's candidate list with explicit loops, so it shares no
code or layout with gemb and a bug in one is unlikely to hide in the other. test_matryoshka.py
and test_sharded_loss.py import it from here.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemb.losses import (
    ContrastiveLossConfig,
    contrastive_loss,
    initial_log_temperature,
    matryoshka_contrastive_loss,
)


@pytest.fixture(autouse=True)
def float64_jax():
    """The 1e-6 comparisons need float64 on the JAX side too. Every test of this module runs
    in float64 with the same [6, 16] shapes, so the eagerly compiled ops are shared."""
    with jax.enable_x64(True):
        yield

def _normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _logsumexp(values):
    values = np.asarray(values, np.float64)
    top = values.max()
    return top + np.log(np.sum(np.exp(values - top)))


def _row_loss(positive_logit, candidate_logits, label_smoothing):
    """-sum_c target_c log softmax_c with the positive among the candidates."""
    everything = [positive_logit] + list(candidate_logits)
    log_z = _logsumexp(everything)
    target = (1 - label_smoothing) * positive_logit + label_smoothing * np.mean(everything)
    return log_z - target


def reference_nce(
    query,
    positive,
    negatives=None,
    negative_mask=None,
    query_hash=None,
    positive_hash=None,
    negative_hash=None,
    *,
    temperature,
    use_other_hard_negatives=False,
    mask_duplicates=True,
    symmetric=False,
    query_query_negatives=False,
    label_smoothing=0.0,
):
    q = _normalize(np.asarray(query, np.float64))
    p = _normalize(np.asarray(positive, np.float64))
    batch = q.shape[0]
    k = 0 if negatives is None else negatives.shape[1]
    n = _normalize(np.asarray(negatives, np.float64)) if k else None
    if k and negative_mask is None:
        negative_mask = np.ones((batch, k), bool)

    def duplicate(hashes_a, a, hashes_b, b):
        return mask_duplicates and hashes_a is not None and hashes_a[a] == hashes_b[b]

    def sim(x, y):
        return float(x @ y) / temperature

    forward = []
    for i in range(batch):
        candidates = []
        for j in range(batch):
            if j == i:
                continue
            if duplicate(positive_hash, j, positive_hash, i) or duplicate(query_hash, j, query_hash, i):
                continue
            candidates.append(sim(q[i], p[j]))
        owners = range(batch) if use_other_hard_negatives else [i]
        for j in owners:
            for slot in range(k):
                if not negative_mask[j, slot]:
                    continue
                if mask_duplicates and negative_hash is not None and positive_hash is not None:
                    if negative_hash[j, slot] == positive_hash[i]:
                        continue
                candidates.append(sim(q[i], n[j, slot]))
        if query_query_negatives:
            for j in range(batch):
                if j != i and not duplicate(query_hash, j, query_hash, i):
                    candidates.append(sim(q[i], q[j]))
        forward.append(_row_loss(sim(q[i], p[i]), candidates, label_smoothing))
    loss = np.mean(forward)

    if symmetric:
        backward = []
        for i in range(batch):
            candidates = [
                sim(p[i], q[j])
                for j in range(batch)
                if j != i
                and not duplicate(query_hash, j, query_hash, i)
                and not duplicate(positive_hash, j, positive_hash, i)
            ]
            backward.append(_row_loss(sim(p[i], q[i]), candidates, label_smoothing))
        loss = 0.5 * (loss + np.mean(backward))
    return loss


def reference_matryoshka(query, positive, negatives, dims, weights=None, **kwargs):
    weights = weights or [1.0] * len(dims)
    total = 0.0
    for dim, weight in zip(dims, weights):
        prefix_negatives = None if negatives is None else negatives[..., :dim]
        total += weight * reference_nce(
            query[..., :dim], positive[..., :dim], prefix_negatives, **kwargs
        )
    return total


def random_batch(seed, batch=6, dim=16, num_negatives=3, duplicates=True):
    """Embeddings and features with missing negatives and (optionally) duplicate texts."""
    rng = np.random.default_rng(seed)
    features = {
        "query": rng.normal(size=(batch, dim)),
        "positive": rng.normal(size=(batch, dim)),
        "query_hash": np.arange(100, 100 + batch, dtype=np.int32),
        "positive_hash": np.arange(200, 200 + batch, dtype=np.int32),
    }
    if num_negatives:
        features["negatives"] = rng.normal(size=(batch, num_negatives, dim))
        mask = np.ones((batch, num_negatives), bool)
        mask[1, -1] = False  # example 1 has one negative fewer
        mask[4, :] = False  # example 4 has none
        features["negative_mask"] = mask
        features["negative_hash"] = np.arange(
            300, 300 + batch * num_negatives, dtype=np.int32
        ).reshape(batch, num_negatives)
    if duplicates:
        features["positive_hash"][3] = features["positive_hash"][0]  # a repeated label string
        features["query_hash"][5] = features["query_hash"][2]  # a repeated query
        if num_negatives:
            # Example 2's hard negative is example 1's positive text: a false negative for
            # query 1 once other examples' negatives are candidates.
            features["negative_hash"][2, 0] = features["positive_hash"][1]
            # Example 0's own negative is its positive text (a mislabelled pair).
            features["negative_hash"][0, -1] = features["positive_hash"][0]
    return features


def gemb_loss(features, config, log_temperature=None, dtype=jnp.float64):
    embeddings = {
        key: jnp.asarray(features[key], dtype)
        for key in ("query", "positive", "negatives")
        if key in features
    }
    batch = {
        key: jnp.asarray(features[key])
        for key in ("negative_mask", "query_hash", "positive_hash", "negative_hash")
        if key in features
    }
    return matryoshka_contrastive_loss(
        embeddings, batch, config=config, log_temperature=log_temperature
    )


def reference_loss(features, config, temperature=None):
    kwargs = dict(
        negative_mask=features.get("negative_mask"),
        query_hash=features["query_hash"],
        positive_hash=features["positive_hash"],
        negative_hash=features.get("negative_hash"),
        temperature=temperature or config.temperature,
        use_other_hard_negatives=config.use_other_hard_negatives,
        mask_duplicates=config.mask_duplicates,
        symmetric=config.symmetric,
        query_query_negatives=config.query_query_negatives,
        label_smoothing=config.label_smoothing,
    )
    dims = config.matryoshka_dims or (features["query"].shape[-1],)
    weights = list(config.matryoshka_weights) if config.matryoshka_weights else None
    return reference_matryoshka(
        features["query"], features["positive"], features.get("negatives"), dims, weights, **kwargs
    )


OPTION_GRID = list(
    itertools.product(
        [0, 1, 3],  # hard negatives per example
        [False, True],  # other examples' hard negatives
        [False, True],  # symmetric
        [False, True],  # query-query negatives
        [(), (4, 8, 16)],  # Matryoshka dims
        [0.0, 0.1],  # label smoothing
    )
)


@pytest.mark.parametrize(
    "num_negatives, other_negatives, symmetric, query_query, dims, smoothing", OPTION_GRID
)
def test_matches_float64_reference(num_negatives, other_negatives, symmetric, query_query, dims, smoothing):
    features = random_batch(seed=num_negatives, num_negatives=num_negatives)
    config = ContrastiveLossConfig(
        temperature=0.05,
        use_other_hard_negatives=other_negatives,
        symmetric=symmetric,
        query_query_negatives=query_query,
        matryoshka_dims=dims,
        matryoshka_weights=(0.5, 1.0, 2.0) if dims else None,
        label_smoothing=smoothing,
    )
    loss, metrics = gemb_loss(features, config)
    assert loss.dtype == jnp.float64
    loss = float(loss)
    expected = reference_loss(features, config)
    np.testing.assert_allclose(loss, expected, rtol=1e-6, atol=1e-6)
    assert np.isfinite(float(metrics["accuracy"]))


@pytest.mark.parametrize("num_negatives", [0, 3])
def test_without_duplicate_masking_matches_unmasked_reference(num_negatives):
    features = random_batch(seed=7, num_negatives=num_negatives)
    config = ContrastiveLossConfig(
        temperature=0.03, mask_duplicates=False, use_other_hard_negatives=True, symmetric=True
    )
    loss = float(gemb_loss(features, config)[0])
    np.testing.assert_allclose(loss, reference_loss(features, config), rtol=1e-6)


def test_repeated_positives_give_the_masked_loss():
    """Classification-style batch: 6 queries, 2 label strings as positives."""
    rng = np.random.default_rng(3)
    labels = rng.normal(size=(2, 16))
    label_of = np.array([0, 1, 0, 0, 1, 1])
    features = {
        "query": rng.normal(size=(6, 16)) + 2 * labels[label_of],
        "positive": labels[label_of],
        "query_hash": np.arange(6, dtype=np.int32),
        "positive_hash": (label_of + 1000).astype(np.int32),
    }
    config = ContrastiveLossConfig(temperature=0.05)
    loss = float(gemb_loss(features, config)[0])
    masked = reference_loss(features, config)
    unmasked = reference_loss(features, ContrastiveLossConfig(temperature=0.05, mask_duplicates=False))
    np.testing.assert_allclose(loss, masked, rtol=1e-6)
    # Unmasked, identical label strings count as negatives, costing about log(3) per row.
    assert unmasked - masked > 1.0
    assert abs(loss - unmasked) > 1.0


def test_the_positive_itself_is_never_masked():
    rng = np.random.default_rng(0)
    same = np.zeros(6, np.int32)  # every query and positive is "the same text"
    features = {
        "query": rng.normal(size=(6, 16)),
        "positive": rng.normal(size=(6, 16)),
        "query_hash": same,
        "positive_hash": same,
    }
    config = ContrastiveLossConfig(query_query_negatives=True, symmetric=True)
    loss, metrics = gemb_loss(features, config)
    # Only the positive survives in each row: probability 1, loss 0, top-1 always right.
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics["accuracy"]) == 1.0


def test_metrics_match_numpy():
    features = random_batch(seed=11, num_negatives=2, duplicates=False)
    config = ContrastiveLossConfig(temperature=0.05, use_other_hard_negatives=True)
    _, metrics = gemb_loss(features, config)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    q, p, n = unit(features["query"]), unit(features["positive"]), unit(features["negatives"])
    mask = features["negative_mask"]
    pos = np.sum(q * p, -1)
    in_batch = q @ p.T
    negative_sims = np.einsum("ie,jke->ijk", q, n)
    negative_sims = np.where(mask[None], negative_sims, -np.inf).reshape(6, -1)
    candidates = np.concatenate([in_batch, negative_sims], 1)
    other_positives = np.where(np.eye(6, dtype=bool), -np.inf, in_batch)
    hardest = np.max(np.concatenate([other_positives, negative_sims], 1), 1)
    np.testing.assert_allclose(float(metrics["positive_similarity"]), pos.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["hardest_negative_similarity"]), hardest.mean(), rtol=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(np.mean(candidates.argmax(1) == np.arange(6)))
    assert float(metrics["temperature"]) == pytest.approx(0.05)


def test_learnable_temperature_is_log_parameterised_and_clipped():
    features = random_batch(seed=5, num_negatives=1)
    config = ContrastiveLossConfig(
        temperature=0.05, learnable_temperature=True, min_temperature=0.01, max_temperature=0.5
    )
    log_tau = initial_log_temperature(config)
    np.testing.assert_allclose(float(jnp.exp(log_tau)), 0.05, rtol=1e-6)

    def loss_at(log_temperature):
        return gemb_loss(features, config, log_temperature)[0]

    for tau in (0.02, 0.2):
        np.testing.assert_allclose(
            float(loss_at(jnp.log(tau))), reference_loss(features, config, temperature=tau), rtol=1e-5
        )
    grad = jax.grad(loss_at)(log_tau)
    assert np.isfinite(float(grad)) and float(grad) != 0.0
    # Outside the range tau is clipped: same loss as at the bound, and no gradient.
    np.testing.assert_allclose(float(loss_at(jnp.log(1e-4))), float(loss_at(jnp.log(0.01))), rtol=1e-6)
    assert float(jax.grad(loss_at)(jnp.log(1e-4))) == 0.0
    _, metrics = gemb_loss(features, config, jnp.log(10.0))
    assert float(metrics["temperature"]) == pytest.approx(0.5)


def test_bfloat16_embeddings_reduce_in_float32():
    features = random_batch(seed=2, num_negatives=3)
    config = ContrastiveLossConfig(temperature=0.02, use_other_hard_negatives=True)
    loss, _ = gemb_loss(features, config, dtype=jnp.bfloat16)
    assert loss.dtype == jnp.float32
    bf16_inputs = {
        key: np.asarray(jnp.asarray(value, jnp.bfloat16), np.float64)
        if key in ("query", "positive", "negatives") else value
        for key, value in features.items()
    }
    np.testing.assert_allclose(float(loss), reference_loss(bf16_inputs, config), rtol=1e-5)


def test_jit_with_the_config_closed_over():
    features = random_batch(seed=9, num_negatives=3)
    config = ContrastiveLossConfig(use_other_hard_negatives=True, matryoshka_dims=(8, 16))
    eager = gemb_loss(features, config)[0]
    jitted = jax.jit(lambda f: gemb_loss(f, config)[0])(features)
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6)


# --- bad input ----------------------------------------------------------------------------


def _call(query, positive, negatives=None, **kwargs):
    return contrastive_loss(
        jnp.zeros(query), jnp.zeros(positive), None if negatives is None else jnp.zeros(negatives), **kwargs
    )


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(query=(4, 8), positive=(4, 6)), "query and positive"),
        (dict(query=(4, 8), positive=(3, 8)), "query and positive"),
        (dict(query=(4, 8), positive=(4, 8), negatives=(4, 8)), "negatives must be"),
        (dict(query=(4, 8), positive=(4, 8), negatives=(3, 2, 8)), "negatives must be"),
        (
            dict(query=(4, 8), positive=(4, 8), negatives=(4, 2, 8), negative_mask=jnp.ones((4, 3), bool)),
            "negative_mask must be",
        ),
        (
            dict(query=(4, 8), positive=(4, 8), negatives=(4, 2, 8), negative_hash=jnp.ones((4,), jnp.int32)),
            "negative_hash must be",
        ),
        (dict(query=(4, 8), positive=(4, 8), query_hash=jnp.ones((5,), jnp.int32)), "query_hash"),
        (dict(query=(4, 8), positive=(4, 8), negative_mask=jnp.ones((4, 1), bool)), "without negatives"),
    ],
)
def test_shape_errors_name_the_argument(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        _call(**kwargs)


@pytest.mark.parametrize(
    "options, pattern",
    [
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(temperature=-0.1), "temperature must be > 0"),
        (dict(min_temperature=0.0), "min_temperature"),
        (dict(learnable_temperature=True, temperature=2.0), "outside"),
        (dict(label_smoothing=1.0), "label_smoothing"),
        (dict(matryoshka_dims=(8, 8)), "repeat a width"),
        (dict(matryoshka_dims=(0, 8)), "positive"),
        (dict(matryoshka_dims=(8, 16), matryoshka_weights=(1.0,)), "one weight per dim"),
    ],
)
def test_config_errors(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        ContrastiveLossConfig(**options)


def test_temperature_argument_must_match_the_config():
    features = random_batch(seed=0, num_negatives=0)
    with pytest.raises(ValueError, match="learnable_temperature is True"):
        gemb_loss(features, ContrastiveLossConfig(learnable_temperature=True), dtype=jnp.float32)
    with pytest.raises(ValueError, match="learnable_temperature is False"):
        gemb_loss(features, ContrastiveLossConfig(), jnp.log(0.05), dtype=jnp.float32)
