"""The encoder on the TINY preset: packing, padding, masks, pooling, head, scan, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from gemb.checkpoints import layout
from gemb.models import attention, encoder, gemma3, heads, pooling
from gemb.models.config import TINY, TINY_ENCODER, EncoderConfig


@pytest.fixture(scope="module")
def tiny():
    model = encoder.Encoder(TINY_ENCODER)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return model, params


def _tokens(seed, length):
    return np.asarray(jax.random.randint(jax.random.key(seed), (length,), 4, TINY.vocab_size))


def _alone(model, params, seq):
    out = model.apply({"params": params}, jnp.asarray(seq[None]))
    return out


@pytest.mark.parametrize("pooling_kind", ["mean", "last_token", "first_token"])
@pytest.mark.parametrize("mode", ["bidirectional", "causal"])
def test_packed_examples_equal_each_alone(pooling_kind, mode):
    config = TINY_ENCODER.replace(pooling=pooling_kind,
                                  transformer=TINY.replace(attention_mode=mode))
    model = encoder.Encoder(config)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    # Both longer than the 8-token sliding window; a padded tail after them.
    first, second = _tokens(1, 13), _tokens(2, 21)
    row = np.zeros((1, 40), np.int32)
    segments = np.zeros((1, 40), np.int32)
    row[0, :13], segments[0, :13] = first, 1
    row[0, 13:34], segments[0, 13:34] = second, 2
    packed = model.apply({"params": params}, jnp.asarray(row), jnp.asarray(segments), num_segments=3)
    np.testing.assert_array_equal(np.asarray(packed["segment_mask"]), [[True, True, False]])
    for slot, seq in enumerate((first, second)):
        alone = _alone(model, params, seq)
        for key in ("pooled", "projected"):
            np.testing.assert_allclose(packed[key][0, slot], alone[key][0, 0], atol=1e-5, rtol=1e-5)
        for dim in config.matryoshka_dims:
            np.testing.assert_allclose(heads.matryoshka_embedding(packed["projected"][0, slot], dim),
                                       heads.matryoshka_embedding(alone["projected"][0, 0], dim),
                                       atol=1e-5)
    np.testing.assert_array_equal(np.asarray(packed["pooled"][0, 2]), 0.0)


def test_padding_does_not_change_the_embedding(tiny):
    model, params = tiny
    seq = _tokens(3, 11)
    padded = np.zeros((1, 32), np.int32)
    padded[0, :11] = seq
    segments = (np.arange(32) < 11).astype(np.int32)[None]
    out = model.apply({"params": params}, jnp.asarray(padded), jnp.asarray(segments))
    alone = _alone(model, params, seq)
    np.testing.assert_allclose(out["projected"], alone["projected"], atol=1e-5, rtol=1e-5)


def test_bidirectional_sees_the_future_and_causal_does_not():
    seq = _tokens(4, 6)
    changed = seq.copy()
    changed[-1] = (changed[-1] + 1) % TINY.vocab_size
    for mode, first_token_changes in (("bidirectional", True), ("causal", False)):
        model = gemma3.Transformer(TINY.replace(attention_mode=mode))
        params = model.init(jax.random.key(0), jnp.asarray(seq[None]))
        a = model.apply(params, jnp.asarray(seq[None]))[0, 0]
        b = model.apply(params, jnp.asarray(changed[None]))[0, 0]
        assert (np.abs(np.asarray(a - b)).max() > 1e-6) == first_token_changes, mode


def _reference_mask(segment_ids, mode, reach, local):
    batch, length = segment_ids.shape
    mask = np.zeros((batch, length, length), bool)
    for b in range(batch):
        for i in range(length):
            for j in range(length):
                ok = segment_ids[b, j] != 0 and segment_ids[b, i] == segment_ids[b, j]
                if mode == "causal":
                    ok = ok and j <= i and (not local or i - j <= reach)
                elif local:
                    ok = ok and abs(i - j) <= reach
                mask[b, i, j] = ok
    return mask


@pytest.mark.parametrize("mode", ["bidirectional", "causal"])
def test_masks_match_a_loop_reference(mode):
    segment_ids = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 0, 0], [1] * 10])
    masks = attention.attention_masks(jnp.asarray(segment_ids), mode, window_reach=2)
    np.testing.assert_array_equal(masks["global"], _reference_mask(segment_ids, mode, 2, False))
    np.testing.assert_array_equal(masks["local_sliding"], _reference_mask(segment_ids, mode, 2, True))


def test_window_reach_split_and_full():
    assert TINY.local_window_reach == 4  # bidirectional, split: w // 2 to each side
    assert TINY.replace(bidirectional_window="full").local_window_reach == 7
    assert TINY.replace(attention_mode="causal").local_window_reach == 7  # 0 <= i - j < w


def test_positions_restart_in_every_segment():
    segment_ids = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(attention.positions_from_segments(segment_ids),
                                  [[0, 1, 2, 0, 1, 0, 0, 0]])


def test_scanned_and_unscanned_layers_agree():
    scanned_model = gemma3.Transformer(TINY)
    unscanned_config = TINY.replace(scan_layers=False)
    unscanned_model = gemma3.Transformer(unscanned_config)
    tokens = jnp.asarray(_tokens(5, 20)[None])
    scanned = nn.unbox(scanned_model.init(jax.random.key(0), tokens)["params"])
    upstream = layout.to_upstream_layout(scanned, TINY)
    assert sorted(k for k in upstream if k.startswith("layer_")) == sorted(
        f"layer_{i}" for i in range(TINY.num_layers))
    unscanned = layout.to_model_layout(upstream, unscanned_config)
    np.testing.assert_allclose(scanned_model.apply({"params": scanned}, tokens),
                               unscanned_model.apply({"params": unscanned}, tokens), atol=1e-5)
    # And the round trip through the upstream layout is exact.
    again = layout.to_model_layout(upstream, TINY)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, jax.tree_util.tree_map(np.asarray, scanned))


@pytest.mark.parametrize("policy", ["full", "dots", "dots_with_no_batch_dims", "save_attn_out"])
def test_remat_policies_keep_values_and_gradients(policy):
    tokens = jnp.asarray(_tokens(6, 12)[None])
    base = gemma3.Transformer(TINY)
    params = base.init(jax.random.key(0), tokens)
    remat = gemma3.Transformer(TINY.replace(remat_policy=policy))

    def loss(model, p):
        return jnp.sum(model.apply(p, tokens) ** 2)

    np.testing.assert_allclose(loss(base, params), loss(remat, params), rtol=1e-6)
    g1, g2 = jax.grad(lambda p: loss(base, p))(params), jax.grad(lambda p: loss(remat, p))(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g1, g2)


def test_matryoshka_prefixes_are_normalised_prefixes(tiny):
    model, params = tiny
    out = model.apply({"params": params}, jnp.asarray(_tokens(7, 9)[None]))
    projected = np.asarray(out["projected"][0, 0])
    for dim in TINY_ENCODER.matryoshka_dims:
        vector = np.asarray(heads.matryoshka_embedding(out["projected"], dim)[0, 0])
        np.testing.assert_allclose(np.linalg.norm(vector), 1.0, rtol=1e-6)
        np.testing.assert_allclose(vector, projected[:dim] / np.linalg.norm(projected[:dim]), rtol=1e-5)


def test_embedding_gemma_head_and_no_head():
    two_layer = EncoderConfig(transformer=TINY, head_dims=(96, 32), matryoshka_dims=(32, 16))
    model = encoder.Encoder(two_layer)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    head = nn.unbox(variables["params"])["head"]
    assert head["dense_0"].shape == (64, 96) and head["dense_1"].shape == (96, 32)
    no_head = EncoderConfig(transformer=TINY, head_dims=(), matryoshka_dims=(64,))
    out = encoder.Encoder(no_head).apply(
        encoder.Encoder(no_head).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)),
        jnp.ones((1, 4), jnp.int32))
    np.testing.assert_allclose(out["projected"], out["pooled"])


def test_mean_pool_excludes_padding():
    hidden = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
    segments = jnp.asarray([[1, 1, 0, 0, 0], [1, 1, 1, 2, 2]])
    pooled = np.asarray(pooling.mean_pool(hidden, segments, 2))
    np.testing.assert_allclose(pooled[0, 0], np.asarray(hidden[0, :2]).mean(0))
    np.testing.assert_allclose(pooled[1, 1], np.asarray(hidden[1, 3:]).mean(0))
    np.testing.assert_allclose(pooled[0, 1], 0.0)
    last = np.asarray(pooling.last_token_pool(hidden, segments, 2))
    np.testing.assert_allclose(last[1, 0], hidden[1, 2])
    first = np.asarray(pooling.first_token_pool(hidden, segments, 2))
    np.testing.assert_allclose(first[1, 1], hidden[1, 3])


def test_bad_configs_and_inputs_are_named():
    with pytest.raises(ValueError, match="matryoshka_dims"):
        EncoderConfig(transformer=TINY, head_dims=(32,), matryoshka_dims=(64,))
    with pytest.raises(ValueError, match="num_kv_heads"):
        TINY.replace(num_kv_heads=3)
    with pytest.raises(ValueError, match="pooling"):
        EncoderConfig(transformer=TINY, pooling="max")
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        gemma3.Transformer(TINY).init(jax.random.key(0), jnp.zeros((4,), jnp.int32))


def test_l2_normalize_of_zero_is_finite():
    assert np.isfinite(np.asarray(heads.l2_normalize(jnp.zeros((2, 4))))).all()
