"""Every preset builds at full size (jax.eval_shape) with the published parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from gemb.models import config, encoder

# Gemma 3 technical report, Table 1: embedding + non-embedding parameters of the text model.
MODEL_CARD_PARAMS = {
    "gemma3_1b": (302 + 698) * 10**6,
    "gemma3_4b": (675 + 3209) * 10**6,
    "gemma3_12b": (1012 + 10759) * 10**6,
    "gemma3_27b": (1416 + 25600) * 10**6,
}
GGUF_270M_VALUES = 268_098_176  # counted in the real GGUF (embedding included)


def _abstract_params(transformer_config):
    model = encoder.Encoder(config.EncoderConfig(transformer=transformer_config))
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    return nn.unbox(boxed["params"])


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name", sorted(config.TRANSFORMER_PRESETS))
def test_preset_builds_at_full_size(name):
    preset = config.TRANSFORMER_PRESETS[name]
    params = _abstract_params(preset)
    transformer_count = _count(params["transformer"])
    assert transformer_count == preset.num_params()
    assert _count(params["head"]) == preset.embed_dim * 3072
    if name == "gemma3_270m":
        assert transformer_count == GGUF_270M_VALUES
    elif name in MODEL_CARD_PARAMS:
        assert abs(transformer_count / MODEL_CARD_PARAMS[name] - 1) < 0.02


def test_preset_details():
    assert config.GEMMA3_1B.num_scanned_periods == 4 and config.GEMMA3_1B.num_remainder_layers == 2
    assert config.GEMMA3_27B.query_scale == pytest.approx(168 ** -0.5)
    assert config.GEMMA3_4B.global_rope_scale_factor == 8.0
    assert config.GEMMA3_1B.global_rope_scale_factor == 1.0
    assert [c.sliding_window_size for c in (config.GEMMA3_270M, config.GEMMA3_1B, config.GEMMA3_4B)] == [512, 512, 1024]
    types = config.GEMMA3_270M.layer_attention_types()
    assert [i for i, t in enumerate(types) if t == config.AttentionType.GLOBAL] == [5, 11, 17]


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="gemma3_270m"):
        config.transformer_preset("gemma3_2b")


def test_compute_dtype_is_bf16_on_accelerators_and_fp32_on_cpu():
    assert config.default_compute_dtype("tpu") == "bfloat16"
    assert config.default_compute_dtype("gpu") == "bfloat16"
    assert config.default_compute_dtype("cpu") == "float32"
    # These tests run on CPU: the gin default resolves to float32 here.
    assert config.default_compute_dtype() == "float32"


def test_bf16_compute_keeps_norms_softmax_and_outputs_in_fp32():
    """bf16 compute with fp32 params: the embeddings come out float32 and stay close to the
    fp32 model's (bf16 has an 8-bit mantissa: about 1e-2 relative)."""
    fp32 = config.TINY_ENCODER
    bf16 = fp32.replace(transformer=fp32.transformer.replace(dtype="bfloat16"))
    tokens = jax.random.randint(jax.random.key(0), (2, 24), 3, 512)
    params = encoder.Encoder(fp32).init(jax.random.key(1), tokens)["params"]
    want = encoder.Encoder(fp32).apply({"params": params}, tokens)["projected"]
    got = encoder.Encoder(bf16).apply({"params": params}, tokens)["projected"]
    assert got.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    cosine = jnp.sum(want * got, -1) / (jnp.linalg.norm(want, axis=-1) * jnp.linalg.norm(got, axis=-1))
    assert float(jnp.min(cosine)) > 0.99, cosine
