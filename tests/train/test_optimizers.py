"""AdamW decay mask, schedules, clipping and the trainable / frozen split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemb.train import optimizers

PARAMS = {
    "encoder": {
        "transformer": {
            "embedder": {"input_embedding": jnp.ones((10, 4))},
            "layer_0": {"attn": {"q_einsum": {"w": jnp.ones((2, 4, 3))}},
                        "pre_attention_norm": {"scale": jnp.ones((4,))}},
            "final_norm": {"scale": jnp.ones((4,))},
        },
        "head": {"dense_0": {"kernel": jnp.ones((4, 6)), "bias": jnp.ones((6,))}},
    },
    "log_temperature": jnp.asarray(-3.0),
}


def test_weight_decay_only_on_matrices_not_norms_or_biases():
    mask = optimizers.decay_mask(PARAMS, optimizers.DEFAULT_NO_DECAY)
    assert mask["encoder"]["transformer"]["layer_0"]["attn"]["q_einsum"]["w"]
    assert mask["encoder"]["head"]["dense_0"]["kernel"]
    assert not mask["encoder"]["transformer"]["layer_0"]["pre_attention_norm"]["scale"]
    assert not mask["encoder"]["transformer"]["final_norm"]["scale"]
    assert not mask["encoder"]["head"]["dense_0"]["bias"]
    assert not mask["log_temperature"]


def test_decay_leaves_norm_scales_alone():
    config = optimizers.OptimizerConfig(learning_rate=0.1, weight_decay=0.5, clip_norm=None,
                                        schedule="constant")
    tx = optimizers.make_optimizer(config, 10).tx
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)
    assert float(jnp.abs(updates["encoder"]["transformer"]["final_norm"]["scale"]).max()) == 0
    assert float(jnp.abs(updates["encoder"]["head"]["dense_0"]["bias"]).max()) == 0
    assert float(updates["encoder"]["head"]["dense_0"]["kernel"][0, 0]) == pytest.approx(-0.05)


@pytest.mark.parametrize("schedule, expected_end", [("cosine", 0.0), ("linear", 0.0),
                                                     ("constant", 1.0)])
def test_warmup_then_schedule(schedule, expected_end):
    config = optimizers.OptimizerConfig(learning_rate=1.0, warmup_steps=10, schedule=schedule)
    fn = optimizers.learning_rate_schedule(config, 110)
    assert float(fn(0)) == 0.0
    assert float(fn(5)) == pytest.approx(0.5)
    assert float(fn(10)) == pytest.approx(1.0)
    assert float(fn(110)) == pytest.approx(expected_end, abs=1e-6)
    if schedule == "cosine":
        assert float(fn(60)) == pytest.approx(0.5, abs=1e-6)


def test_global_norm_clipping():
    config = optimizers.OptimizerConfig(learning_rate=1.0, clip_norm=1.0, schedule="constant",
                                        b1=0.0, b2=0.0, eps=0.0)
    params = {"w": jnp.zeros((2, 2))}
    tx = optimizers.make_optimizer(config, 10).tx
    grads = {"w": jnp.full((2, 2), 100.0)}
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam with b1 = b2 = 0 normalises per entry; clipping must not produce nan / inf.
    assert np.isfinite(np.asarray(updates["w"])).all()
    clipped, _ = optimizers.optax.clip_by_global_norm(1.0).update(grads, None)
    assert float(optimizers.optax.global_norm(clipped)) == pytest.approx(1.0)


def test_split_trainable_and_merge_round_trip():
    patterns = (r"embedder", r"layer_0/")
    trainable, frozen = optimizers.split_trainable(PARAMS, patterns)
    assert "embedder" not in trainable["encoder"]["transformer"]
    assert set(frozen["encoder"]["transformer"]) == {"embedder", "layer_0"}
    merged = optimizers.merge_params(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(PARAMS)


def test_freeze_patterns_are_checked():
    with pytest.raises(ValueError, match="matches no parameter"):
        optimizers.check_freeze_patterns(PARAMS, ["no_such_layer"])
    with pytest.raises(ValueError, match="freeze every parameter"):
        optimizers.check_freeze_patterns(PARAMS, [".*"])
    with pytest.raises(ValueError, match="bad regex"):
        optimizers.OptimizerConfig(freeze_patterns=("(",))
    with pytest.raises(ValueError, match="schedule"):
        optimizers.OptimizerConfig(schedule="step")


def test_adam_first_moment_is_fp32_even_for_bf16_params():
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    optimizer = optimizers.make_optimizer(optimizers.OptimizerConfig(), total_steps=10)
    state = optimizer.tx.init(bf16)
    moments = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu"))
               if hasattr(s, "mu")]
    assert moments, "no Adam state found"
    assert {leaf.dtype for leaf in jax.tree.leaves(moments[0].mu)} == {jnp.dtype(jnp.float32)}
