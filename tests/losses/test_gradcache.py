"""Gradient caching gives the full-batch gradients, and its memory does not grow with the batch."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemb.losses import (
    ContrastiveLossConfig,
    full_batch_value_and_grad,
    gradient_cached_rows_value_and_grad,
    gradient_cached_value_and_grad,
    initial_log_temperature,
    matryoshka_contrastive_loss,
)

INPUT_DIM = 12
EMBEDDING_DIM = 16


class MlpEmbedder(nn.Module):
    hidden_dim: int = 32
    embedding_dim: int = EMBEDDING_DIM

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(self.hidden_dim)(x))
        return nn.Dense(self.embedding_dim)(x)


def mlp_embed_fn(model):
    """embed_fn for batches of raw feature vectors: query / positive [b, D], negatives [b, K, D]."""

    def embed(params, batch, rng):
        del rng
        embeddings = {
            "query": model.apply({"params": params["encoder"]}, batch["query_inputs"]),
            "positive": model.apply({"params": params["encoder"]}, batch["positive_inputs"]),
        }
        if "negative_inputs" in batch:
            negatives = batch["negative_inputs"]
            embeddings["negatives"] = model.apply({"params": params["encoder"]}, negatives)
        return embeddings

    return embed


def contrastive_loss_fn(config):
    def loss_fn(params, embeddings, batch):
        return matryoshka_contrastive_loss(
            embeddings, batch, config=config, log_temperature=params.get("log_temperature")
        )

    return loss_fn


def mlp_batch(seed, batch=16, num_negatives=0, duplicates=True):
    rng = np.random.default_rng(seed)
    features = {
        "query_inputs": rng.normal(size=(batch, INPUT_DIM)).astype(np.float32),
        "positive_inputs": rng.normal(size=(batch, INPUT_DIM)).astype(np.float32),
        "query_hash": np.arange(batch, dtype=np.int32),
        "positive_hash": np.arange(batch, 2 * batch, dtype=np.int32),
    }
    if num_negatives:
        shape = (batch, num_negatives, INPUT_DIM)
        features["negative_inputs"] = rng.normal(size=shape).astype(np.float32)
        mask = rng.random((batch, num_negatives)) > 0.3
        features["negative_mask"] = mask
        features["negative_hash"] = rng.integers(1000, 2000, size=shape[:2], dtype=np.int32)
    if duplicates:
        features["positive_hash"][5] = features["positive_hash"][1]
        features["query_hash"][9] = features["query_hash"][2]
    return jax.tree.map(jnp.asarray, features)


def assert_trees_close(actual, expected, rtol=1e-5):
    """Elementwise rtol, with an absolute floor of rtol times the leaf's largest entry.

    The cached step sums a gradient entry chunk by chunk, the direct step all at once; an entry
    that is a near-cancelling sum keeps the absolute float32 error of its largest terms, so a
    pure elementwise rtol would flag summation order, not a bug.
    """

    def check(a, e):
        a, e = np.asarray(a), np.asarray(e)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * float(np.abs(e).max()))

    jax.tree.map(check, actual, expected)


@pytest.mark.parametrize(
    "num_negatives, config",
    [
        (0, ContrastiveLossConfig(temperature=0.05)),
        (
            3,
            ContrastiveLossConfig(
                temperature=0.05,
                learnable_temperature=True,
                use_other_hard_negatives=True,
                matryoshka_dims=(4, 8, 16),
                matryoshka_weights=(0.5, 1.0, 2.0),
                symmetric=True,
                label_smoothing=0.1,
            ),
        ),
    ],
    ids=["plain", "matryoshka_hard_negatives_symmetric_learnt_temperature"],
)
def test_cached_gradients_equal_full_batch_gradients_mlp(num_negatives, config):
    model = MlpEmbedder()
    params = {"encoder": model.init(jax.random.key(0), jnp.zeros((1, INPUT_DIM)))["params"]}
    if config.learnable_temperature:
        # The loss owns a parameter: its gradient comes from the loss, not from the re-run.
        params["log_temperature"] = initial_log_temperature(config)
    batch = mlp_batch(seed=num_negatives, num_negatives=num_negatives)
    embed_fn, loss_fn = mlp_embed_fn(model), contrastive_loss_fn(config)

    (loss, metrics), grads = jax.jit(full_batch_value_and_grad(embed_fn, loss_fn))(params, batch)
    cached = jax.jit(gradient_cached_value_and_grad(embed_fn, loss_fn, chunk_size=4))
    (cached_loss, cached_metrics), cached_grads = cached(params, batch)

    np.testing.assert_allclose(float(cached_loss), float(loss), rtol=1e-6)
    assert_trees_close(cached_metrics, metrics, rtol=1e-6)
    assert_trees_close(cached_grads, grads)
    assert float(jnp.abs(grads["encoder"]["Dense_0"]["kernel"]).max()) > 0
    if config.learnable_temperature:
        assert float(grads["log_temperature"]) != 0.0


def test_randomness_is_folded_per_chunk_and_reproduced_in_the_second_pass():
    """With dropout, the re-run of a chunk must see the same mask as its first pass."""
    dropout_rate = 0.5

    def embed_fn(params, batch, rng):
        def embed(x, key):
            keep = jax.random.bernoulli(key, 1 - dropout_rate, x.shape)
            return jnp.tanh(jnp.where(keep, x, 0.0) @ params["w"])

        query_key, positive_key = jax.random.split(rng)
        return {"query": embed(batch["query_inputs"], query_key),
                "positive": embed(batch["positive_inputs"], positive_key)}

    config = ContrastiveLossConfig(temperature=0.1)
    loss_fn = contrastive_loss_fn(config)
    params = {"w": jax.random.normal(jax.random.key(0), (INPUT_DIM, EMBEDDING_DIM))}
    batch = mlp_batch(seed=2, batch=8, duplicates=False)
    rng = jax.random.key(42)
    chunk_size, num_chunks = 4, 2

    def chunked_reference_loss(params):
        # Chunk c holds rows c, c + 2, ... and is embedded with fold_in(rng, c).
        pieces = [
            embed_fn(
                params,
                jax.tree.map(lambda x: x[c::num_chunks], batch),
                jax.random.fold_in(rng, c),
            )
            for c in range(num_chunks)
        ]
        embeddings = {
            key: jnp.stack([piece[key] for piece in pieces], axis=1).reshape(8, -1)
            for key in pieces[0]
        }
        return loss_fn(params, embeddings, batch)[0]

    expected_loss, expected_grads = jax.jit(jax.value_and_grad(chunked_reference_loss))(params)
    cached = jax.jit(gradient_cached_value_and_grad(embed_fn, loss_fn, chunk_size))
    (loss, _), grads = cached(params, batch, rng)
    np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-6)
    assert_trees_close(grads, expected_grads)


def test_batch_not_divisible_by_chunk_is_an_error():
    model = MlpEmbedder()
    params = {"encoder": model.init(jax.random.key(0), jnp.zeros((1, INPUT_DIM)))["params"]}
    embed_fn, loss_fn = mlp_embed_fn(model), contrastive_loss_fn(ContrastiveLossConfig())
    step = gradient_cached_value_and_grad(embed_fn, loss_fn, 4)
    with pytest.raises(ValueError, match="batch of 10 is not divisible by the gradient-cache chunk_size=4"):
        step(params, mlp_batch(seed=0, batch=10))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        gradient_cached_value_and_grad(embed_fn, loss_fn, 0)
    ragged = dict(mlp_batch(seed=0, batch=8, duplicates=False), query_hash=jnp.arange(6))
    with pytest.raises(ValueError, match="leading axis"):
        step(params, ragged)


def test_cached_rows_read_by_index_equal_the_direct_gradient():
    """Row blocks of different sizes, examples read from the rows by index (as packed slots,
    some rows read twice, some not at all): caching dL/d(row outputs) through the gather gives
    the gradient of differentiating it end to end."""
    model = MlpEmbedder()
    params = {"encoder": model.init(jax.random.key(0), jnp.zeros((1, INPUT_DIM)))["params"]}
    rng = np.random.default_rng(0)
    rows = {"query": rng.normal(size=(12, INPUT_DIM)).astype(np.float32),
            "positive": rng.normal(size=(8, INPUT_DIM)).astype(np.float32)}
    batch = {"query_slot": np.array([0, 0, 3, 5, 11, 7, 6, 2]),  # row 0 twice, 1 never
             "positive_slot": rng.permutation(8),
             "query_hash": np.arange(8, dtype=np.int32),
             "positive_hash": np.arange(8, 16, dtype=np.int32)}
    loss_fn = contrastive_loss_fn(ContrastiveLossConfig(temperature=0.1))

    def encode(params, rows, rng):
        del rng
        return {role: model.apply({"params": params["encoder"]}, x) for role, x in rows.items()}

    def loss_from_rows(params, outputs, batch):
        embeddings = {role: outputs[role][batch[f"{role}_slot"]] for role in outputs}
        return loss_fn(params, embeddings, batch)

    def direct(params):
        return loss_from_rows(params, encode(params, rows, None), batch)

    (loss, _), grads = jax.jit(jax.value_and_grad(direct, has_aux=True))(params)
    cached = jax.jit(gradient_cached_rows_value_and_grad(encode, loss_from_rows, 4))
    (cached_loss, _), cached_grads = cached(params, rows, batch)
    np.testing.assert_allclose(float(cached_loss), float(loss), rtol=1e-6)
    assert_trees_close(cached_grads, grads)
    with pytest.raises(ValueError, match=r"the rows of \['positive'\] \(8 rows.*cannot be split "
                                         r"into 3 gradient-cache chunks"):
        gradient_cached_rows_value_and_grad(encode, loss_from_rows, 3)(params, rows, batch)


def test_embed_fn_must_return_only_float_arrays():
    def embed_fn(params, batch, rng):
        return {
            "query": batch["query_inputs"] @ params["w"],
            "positive": batch["positive_inputs"] @ params["w"],
            "row_ok": jnp.ones(batch["query_inputs"].shape[:1], bool),
        }

    step = gradient_cached_value_and_grad(embed_fn, contrastive_loss_fn(ContrastiveLossConfig()), 4)
    params = {"w": jnp.ones((INPUT_DIM, EMBEDDING_DIM))}
    with pytest.raises(ValueError, match="non-float outputs"):
        step(params, mlp_batch(seed=0, batch=8, duplicates=False))


def _compiled_peak_bytes(fn, *args):
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    return (
        analysis.temp_size_in_bytes
        + analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
    )


def test_cached_step_memory_grows_only_with_embeddings_and_logits():
    """A wide MLP stands in for the encoder: its activations per row dwarf an embedding row."""
    hidden_dim, chunk_size = 4096, 16
    model = MlpEmbedder(hidden_dim=hidden_dim)
    config = ContrastiveLossConfig()
    embed_fn, loss_fn = mlp_embed_fn(model), contrastive_loss_fn(config)
    params = jax.eval_shape(
        lambda: {"encoder": model.init(jax.random.key(0), jnp.zeros((1, INPUT_DIM)))["params"]}
    )

    def batch_spec(batch_size):
        make = functools.partial(mlp_batch, seed=0, batch=batch_size, duplicates=False)
        return jax.eval_shape(make)

    small, large = 64, 512
    cached_step = gradient_cached_value_and_grad(embed_fn, loss_fn, chunk_size)
    full_step = full_batch_value_and_grad(embed_fn, loss_fn)
    cached = {b: _compiled_peak_bytes(cached_step, params, batch_spec(b)) for b in (small, large)}
    full = {b: _compiled_peak_bytes(full_step, params, batch_spec(b)) for b in (small, large)}

    rows = large - small
    activations_per_row = 2 * hidden_dim * 4  # query + positive hidden layer, float32
    embeddings_and_logits = 4 * (2 * EMBEDDING_DIM * rows + (large**2 - small**2))
    inputs = 4 * 2 * INPUT_DIM * rows + 4 * 2 * rows  # the batch arguments themselves
    cached_growth = cached[large] - cached[small]
    full_growth = full[large] - full[small]
    assert full_growth > rows * activations_per_row  # the naive step keeps every activation
    # A few copies of the B x B logits (exp, softmax, gradient) and of the embeddings are fine;
    # anything proportional to the hidden activations is not.
    assert cached_growth < 4 * embeddings_and_logits + inputs, (cached_growth, embeddings_and_logits)
    assert cached_growth < rows * activations_per_row / 4


# --- the TINY Gemma encoder ---------------------------------------------------------------

SEQUENCE_LENGTH = 12


def encoder_embed_fn(encoder):
    """Token batches -> the encoder's unnormalised projection for query, positive, negatives.

    All texts of a chunk go through one encoder call: one traced copy of the transformer
    instead of three keeps the compile time of these tests down.
    """

    def embed(params, batch, rng):
        del rng
        rows, length = batch["query_tokens"].shape
        texts = [batch["query_tokens"], batch["positive_tokens"]]
        num_negatives = 0
        if "negative_tokens" in batch:
            num_negatives = batch["negative_tokens"].shape[1]
            texts.append(batch["negative_tokens"].reshape(rows * num_negatives, length))
        tokens = jnp.concatenate(texts, axis=0)
        segment_ids = (tokens != 0).astype(jnp.int32)
        output = encoder.apply({"params": params["encoder"]}, tokens, segment_ids)
        projected = output["projected"][:, 0, :]
        embeddings = {"query": projected[:rows], "positive": projected[rows : 2 * rows]}
        if num_negatives:
            embeddings["negatives"] = projected[2 * rows :].reshape(rows, num_negatives, -1)
        return embeddings

    return embed


def token_batch(seed, batch, num_negatives, vocab_size):
    rng = np.random.default_rng(seed)

    def tokens(*shape):
        ids = rng.integers(1, vocab_size, size=shape + (SEQUENCE_LENGTH,), dtype=np.int32)
        lengths = rng.integers(3, SEQUENCE_LENGTH + 1, size=shape)
        return np.where(np.arange(SEQUENCE_LENGTH) < lengths[..., None], ids, 0).astype(np.int32)

    features = {
        "query_tokens": tokens(batch),
        "positive_tokens": tokens(batch),
        "query_hash": np.arange(batch, dtype=np.int32),
        "positive_hash": np.arange(batch, dtype=np.int32) + 100,
    }
    features["positive_hash"][3] = features["positive_hash"][0]
    if num_negatives:
        features["negative_tokens"] = tokens(batch, num_negatives)
        present = rng.integers(0, num_negatives + 1, (batch, 1))
        features["negative_mask"] = np.arange(num_negatives)[None, :] < present
        features["negative_hash"] = rng.integers(1000, 2000, (batch, num_negatives), dtype=np.int32)
    return jax.tree.map(jnp.asarray, features)


def _tiny_encoder():
    from gemb.models import config as model_config
    from gemb.models.encoder import Encoder

    return Encoder(model_config.TINY_ENCODER), model_config.TINY_ENCODER


@pytest.mark.slow
@pytest.mark.parametrize(
    "num_negatives, config",
    [
        (0, ContrastiveLossConfig(temperature=0.05)),
        (
            2,
            ContrastiveLossConfig(
                temperature=0.05, matryoshka_dims=(24, 48, 96), use_other_hard_negatives=True
            ),
        ),
    ],
    ids=["plain", "matryoshka_hard_negatives"],
)
def test_cached_gradients_equal_full_batch_gradients_tiny_gemma(num_negatives, config):
    encoder, encoder_config = _tiny_encoder()
    batch = token_batch(seed=0, batch=8, num_negatives=num_negatives,
                        vocab_size=encoder_config.transformer.vocab_size)
    # Random weights of the right shapes: flax's init would cost a compile of its own.
    shapes = jax.eval_shape(encoder.init, jax.random.key(0), batch["query_tokens"][:1])
    rng = np.random.default_rng(0)
    params = {
        "encoder": jax.tree.map(
            lambda leaf: jnp.asarray(0.1 * rng.normal(size=leaf.shape), leaf.dtype),
            nn.unbox(shapes["params"]),
        )
    }
    embed_fn, loss_fn = encoder_embed_fn(encoder), contrastive_loss_fn(config)

    (loss, _), grads = jax.jit(full_batch_value_and_grad(embed_fn, loss_fn))(params, batch)
    cached = jax.jit(gradient_cached_value_and_grad(embed_fn, loss_fn, chunk_size=2))
    (cached_loss, _), cached_grads = cached(params, batch)
    np.testing.assert_allclose(float(cached_loss), float(loss), rtol=1e-6)
    assert_trees_close(cached_grads, grads, rtol=1e-5)

