"""Every attention backend equals the dense 'xla' reference: forward and gradients, fp32.

Layer-level cases cover global and local layers, bidirectional and causal masks, padding,
packed segments, one kv head and several; the Pallas kernels (TPU splash, GPU flash) run in
interpret mode on CPU. cuDNN has no CPU implementation: its choice of layers is tested here;
its numerics need an NVIDIA GPU (test_cudnn_equals_xla_on_a_gpu runs only there).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemb.models import attention_backends as backends
from gemb.models.config import TINY, TINY_ENCODER
from gemb.models.encoder import Encoder

RTOL = 1e-5


def _segments(batch: int, length: int, layout: str, seed: int) -> np.ndarray:
    """[B, T] segment ids: 'full' rows, 'padded' (one example then padding) or 'packed'
    (several examples of random lengths, then padding)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, length), np.int32)
    for row in range(batch):
        if layout == "full":
            ids[row] = 1
        elif layout == "padded":
            ids[row, :rng.integers(length // 4, length + 1)] = 1
        else:
            column, segment = 0, 1
            while column < length - 2:
                size = int(rng.integers(1, length // 2))
                ids[row, column:column + size] = segment
                column, segment = column + size, segment + 1
            ids[row, length - int(rng.integers(0, 3)):] = 0  # some trailing padding
    return ids


def _inputs(batch, length, heads, kv_heads, head_dim, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    query = jax.random.normal(keys[0], (batch, length, heads, head_dim)) * head_dim**-0.5
    key = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim))
    value = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim))
    weights = jax.random.normal(keys[3], (batch, length, heads, head_dim))
    return query, key, value, weights


def _value_and_grads(backend, spec, query, key, value, segment_ids, weights, packed=True):
    """The layer's output at real positions, and the gradient of a weighted sum of it."""
    real = (segment_ids != 0)[:, :, None, None]

    def objective(q, k, v):
        out = backends.attend(q, k, v, segment_ids, spec, backend, packed=packed)
        return jnp.sum(jnp.where(real, out * weights, 0.0)), out

    (_, out), grads = jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True)(
        query, key, value)
    return np.where(np.asarray(real), np.asarray(out), 0.0), [np.asarray(g) for g in grads]


def _assert_close(actual, expected, what):
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    error = float(np.max(np.abs(np.asarray(actual) - np.asarray(expected))))
    assert error <= RTOL * scale, f"{what}: max |diff| {error:.3g} > {RTOL} x {scale:.3g}"


def _check_against_xla(backend, spec, layout, kv_heads, length, seed=0):
    query, key, value, weights = _inputs(2, length, 4, kv_heads, 16, seed)
    segment_ids = jnp.asarray(_segments(2, length, layout, seed))
    expected, expected_grads = _value_and_grads("xla", spec, query, key, value, segment_ids,
                                                weights)
    actual, grads = _value_and_grads(backend, spec, query, key, value, segment_ids, weights)
    _assert_close(actual, expected, f"{backend} output")
    for name, grad, want in zip(("query", "key", "value"), grads, expected_grads):
        _assert_close(grad, want, f"{backend} d/d{name}")


CASES = [
    pytest.param(mode, reach, layout, kv_heads, id=f"{mode}-{'local' if reach else 'global'}-"
                                                    f"{layout}-kv{kv_heads}")
    for mode in ("bidirectional", "causal")
    for reach in (None, 5)
    for layout in ("padded", "packed")
    for kv_heads in (1, 2)
]


@pytest.mark.parametrize("mode,reach,layout,kv_heads", CASES)
def test_blockwise_equals_xla(mode, reach, layout, kv_heads):
    # Blocks of 8 rows in rows of 44: several blocks, a partial last one, and (local layers)
    # bands of 8 + 2 x 5 keys that start and end inside the row.
    spec = backends.LayerSpec(mode, reach, block_size=8)
    _check_against_xla("blockwise", spec, layout, kv_heads, length=44)


def test_blockwise_local_layer_computes_only_the_band():
    """A local layer's blocks are scored against the window's band, not the whole row: the
    compiled forward does fewer FLOPs than the dense one, by about band / row."""
    length, block, reach = 512, 64, 16
    query, key, value, _ = _inputs(1, length, 4, 1, 16)
    segment_ids = jnp.ones((1, length), jnp.int32)

    def flops(backend):
        spec = backends.LayerSpec("bidirectional", reach, block_size=block)
        fn = jax.jit(functools.partial(backends.attend, segment_ids=segment_ids, spec=spec,
                                       backend=backend))
        return fn.lower(query, key, value).compile().cost_analysis()["flops"]

    band = block + 2 * reach
    ratio = flops("blockwise") / flops("xla")
    assert ratio < 1.3 * band / length, (ratio, band / length)


@pytest.mark.parametrize("mode,reach,layout,kv_heads", [
    ("bidirectional", None, "packed", 1), ("bidirectional", 40, "padded", 2),
    ("causal", 40, "packed", 2), ("causal", None, "padded", 1)])
def test_splash_equals_xla_in_interpret_mode(mode, reach, layout, kv_heads):
    # 200 rows padded to 256: two 128-row blocks, so the window's block skipping is exercised.
    spec = backends.LayerSpec(mode, reach, block_size=128)
    with backends.interpret_kernels():
        _check_against_xla("splash", spec, layout, kv_heads, length=200)


@pytest.mark.parametrize("mode,layout,kv_heads", [
    ("bidirectional", "packed", 1), ("bidirectional", "padded", 2), ("causal", "packed", 2)])
def test_pallas_gpu_equals_xla_in_interpret_mode(mode, layout, kv_heads):
    spec = backends.LayerSpec(mode, None)
    with backends.interpret_kernels():
        _check_against_xla("pallas_gpu", spec, layout, kv_heads, length=100)


def test_backend_resolution_per_platform_and_layer():
    local = backends.LayerSpec("bidirectional", 256)
    glob = backends.LayerSpec("bidirectional", None)
    causal_local = backends.LayerSpec("causal", 256)
    resolve = functools.partial(backends.resolve_backend, length=2048)
    assert resolve("auto", glob, packed=False, platform="tpu") == "splash"
    assert resolve("auto", local, packed=True, platform="tpu") == "splash"
    assert resolve("auto", glob, packed=False, platform="gpu") == "cudnn"
    assert resolve("auto", glob, packed=True, platform="gpu") == "pallas_gpu"
    # cuDNN refuses a two-sided window, and the Pallas GPU kernel has none: the band instead.
    assert resolve("auto", local, packed=False, platform="gpu") == "blockwise"
    assert resolve("cudnn", causal_local, packed=False, platform="gpu") == "cudnn"
    assert resolve("pallas_gpu", local, packed=True, platform="gpu") == "blockwise"
    # CPU: blocks for rows longer than one block, the dense path (no re-computation) otherwise.
    assert resolve("auto", glob, packed=True, platform="cpu") == "blockwise"
    assert backends.resolve_backend("auto", glob, True, length=512, platform="cpu") == "xla"
    assert resolve("xla", local, packed=True, platform="tpu") == "xla"
    with pytest.raises(ValueError, match="attention_backend='flash'"):
        resolve("flash", glob, packed=True)
    with pytest.raises(ValueError, match="attention_backend='flash'"):
        TINY.replace(attention_backend="flash")


def test_encoder_blockwise_equals_xla():
    """The whole TINY encoder (both layer types, GQA, scanned and unscanned layers): the
    pooled embeddings and every parameter gradient, on packed rows with trailing padding (the
    layer-level cases above cover the padded layout)."""
    batch, length = 3, 40
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(3, TINY.vocab_size, (batch, length)), jnp.int32)
    segment_ids = jnp.asarray(_segments(batch, length, "packed", seed=2))
    num_segments = int(segment_ids.max())
    xla_config = TINY_ENCODER.replace(transformer=TINY.replace(attention_backend="xla"))
    params = Encoder(xla_config).init(jax.random.key(0), tokens, segment_ids,
                                      num_segments=num_segments)["params"]

    def embeddings_and_grads(config):
        def objective(p):
            out = Encoder(config).apply({"params": p}, tokens, segment_ids,
                                        num_segments=num_segments)
            projected = jnp.where(out["segment_mask"][..., None], out["projected"], 0.0)
            return jnp.sum(jnp.sin(projected)), projected

        (_, projected), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return projected, grads

    expected, expected_grads = embeddings_and_grads(xla_config)
    blockwise = TINY_ENCODER.replace(transformer=TINY.replace(attention_backend="blockwise",
                                                              attention_block_size=16))
    actual, grads = embeddings_and_grads(blockwise)
    _assert_close(actual, expected, "projected")
    for (path, grad), want in zip(jax.tree_util.tree_leaves_with_path(grads),
                                  jax.tree.leaves(expected_grads)):
        _assert_close(grad, want, jax.tree_util.keystr(path))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
@pytest.mark.parametrize("mode,reach", [("bidirectional", None), ("causal", None), ("causal", 5)])
def test_cudnn_equals_xla_on_a_gpu(mode, reach):
    # Padded rows only (one example per row from column 0): what cuDNN's lengths describe.
    # cuDNN's fused kernel takes bf16 / fp16 inputs, hence a bf16 tolerance against fp32 xla.
    spec = backends.LayerSpec(mode, reach)
    query, key, value, weights = _inputs(2, 64, 4, 1, 64)
    segment_ids = jnp.asarray(_segments(2, 64, "padded", 0))
    expected, _ = _value_and_grads("xla", spec, query, key, value, segment_ids, weights, False)
    actual, _ = _value_and_grads("cudnn", spec, query.astype(jnp.bfloat16),
                                 key.astype(jnp.bfloat16), value.astype(jnp.bfloat16),
                                 segment_ids, weights, False)
    np.testing.assert_allclose(actual, expected, atol=2e-2, rtol=2e-2)
