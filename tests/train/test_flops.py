"""gemb.train.flops against independent counts: the matmuls jax actually traces for a TINY
encoder (every dot_general of the jaxpr, scans unrolled by their length), a brute-force count of
the (query, key) pairs a mask allows, and hand counts."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemb.data.feature_converter import FeatureConverter, FeatureConverterConfig, RoleTokens, TokenBatch
from gemb.models import encoder as encoder_lib
from gemb.models import gemma3
from gemb.models.config import TINY, TINY_ENCODER, AttentionType, TransformerConfig
from gemb.train import flops, metrics_writer


def _dense(config: TransformerConfig) -> TransformerConfig:
    """The dense reference attention, whose score matmuls appear in the jaxpr as two einsums
    over all (query, key) pairs (a fused or blockwise backend would hide or split them)."""
    names = {field.name for field in dataclasses.fields(config)}
    return config.replace(attention_backend="xla") if "attention_backend" in names else config


def _sub_jaxprs(value):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def dot_flops(jaxpr) -> int:
    """2 x multiply-adds of every dot_general a jaxpr runs (a scan's body times its length)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
            rhs_free = [d for i, d in enumerate(rhs) if i not in (*rhs_contract, *rhs_batch)]
            total += 2 * math.prod(lhs) * math.prod(rhs_free)
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                total += times * dot_flops(sub)
    return total


def test_hand_counts():
    # Bidirectional split window of reach 2 over 10 tokens: 3 + 4 + 6 * 5 + 4 + 3 keys.
    config = TINY.replace(sliding_window_size=4)
    assert config.local_window_reach == 2
    assert flops.attended_pairs(np.array([10]), AttentionType.LOCAL_SLIDING, config) == 44
    assert flops.attended_pairs(np.array([10, 3]), AttentionType.GLOBAL, config) == 109
    causal = config.replace(attention_mode="causal")  # reach w - 1 = 3, one-sided: 1+2+3+4*7
    assert flops.attended_pairs(np.array([10]), AttentionType.LOCAL_SLIDING, causal) == 34
    assert flops.attended_pairs(np.array([10]), AttentionType.GLOBAL, causal) == 55
    # Segments of a packed row and of padded rows; padding (0) is no segment.
    segment_ids = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 0, 0, 0, 0]])
    assert sorted(flops.segment_lengths(segment_ids).tolist()) == [2, 2, 3]
    # Gemma 3 270M: 2 x 100.2M matmul weights per token (the 168M embedding table excluded).
    from gemb.models.config import GEMMA3_270M

    assert flops.matmul_weights(GEMMA3_270M) == 18 * (2 * 640 * 4 * 256 + 2 * 640 * 256
                                                      + 3 * 640 * 2048)


@pytest.mark.parametrize("changes", [{}, {"bidirectional_window": "full"},
                                     {"attention_mode": "causal"}],
                         ids=["bidirectional_split", "bidirectional_full", "causal"])
def test_attended_pairs_match_a_brute_force_mask(changes):
    config = TINY.replace(**changes)
    rng = np.random.default_rng(0)
    rows = np.zeros((6, 40), np.int64)
    for row in rows:  # packed rows: segments 1, 2, ... of random lengths, then padding
        column, segment = 0, 1
        while True:
            length = int(rng.integers(1, 20))
            if column + length > len(row) - int(rng.integers(0, 4)):
                break
            row[column:column + length] = segment
            column, segment = column + length, segment + 1
    index = np.arange(rows.shape[1])
    offset = index[:, None] - index[None, :]  # query minus key
    same = (rows[:, :, None] == rows[:, None, :]) & (rows[:, None, :] != 0)
    if config.attention_mode == "causal":
        same &= offset >= 0
        window = offset <= config.local_window_reach
    else:
        window = np.abs(offset) <= config.local_window_reach
    lengths = flops.segment_lengths(rows)
    assert flops.attended_pairs(lengths, AttentionType.GLOBAL, config) == same.sum()
    assert (flops.attended_pairs(lengths, AttentionType.LOCAL_SLIDING, config)
            == (same & window).sum())


def test_encoder_forward_matches_the_traced_matmuls():
    # Rows of 5 real tokens: TINY's local reach is 4, so every layer attends every pair, which
    # is what the dense attention's einsums compute; the count must then be exact.
    encoder = dataclasses.replace(TINY_ENCODER, transformer=_dense(TINY))
    batch, length = 3, 5
    tokens = jnp.ones((batch, length), jnp.int32)
    segment_ids = jnp.ones((batch, length), jnp.int32)
    module = encoder_lib.Encoder(encoder)
    params = jax.eval_shape(module.init, jax.random.key(0), tokens)
    traced = dot_flops(jax.make_jaxpr(module.apply)(params, tokens, segment_ids).jaxpr)
    # Mean pooling is a one-hot einsum [B, L, S] x [B, L, D] that the model count leaves out.
    pooling = 2 * batch * length * 1 * TINY.embed_dim
    expected = flops.encoder_forward_flops(encoder, np.asarray(segment_ids))
    assert traced - pooling == expected
    print(f"TINY encoder forward [{batch}, {length}]: traced dots {traced:,} - pooling "
          f"{pooling:,} = formula {expected:,}")


def test_train_is_three_forwards_of_the_traced_matmuls():
    config = _dense(TINY)
    module = gemma3.Transformer(config)
    tokens = jnp.ones((2, 5), jnp.int32)
    params = jax.eval_shape(module.init, jax.random.key(0), tokens)

    def loss(params):
        return jnp.sum(module.apply(params, tokens))

    forward = dot_flops(jax.make_jaxpr(loss)(params).jaxpr)
    train = dot_flops(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    assert train == flops.TRAIN_FLOPS_PER_FORWARD_FLOP * forward
    assert forward == flops.encoder_forward_flops(
        dataclasses.replace(TINY_ENCODER, transformer=config, head_dims=(),
                            matryoshka_dims=(TINY.embed_dim,)), np.ones((2, 5)))


def _token_batch(rng, batch_size=6, negatives=2):
    def texts(count, allow_empty=False):
        lengths = rng.integers(0 if allow_empty else 1, 30, count)
        return RoleTokens.from_lists([rng.integers(3, 500, n) for n in lengths])

    return TokenBatch(texts(batch_size), texts(batch_size),
                      texts(batch_size * negatives, allow_empty=True),
                      np.full(batch_size, negatives, np.int32))


def test_padded_and_packed_features_cost_the_same():
    batch = _token_batch(np.random.default_rng(1))
    padded = FeatureConverter(FeatureConverterConfig(query_length=32, document_length=32)).convert(batch)
    packed = FeatureConverter(FeatureConverterConfig(query_length=32, document_length=32,
                                                     pack=True, segments_per_row=4)).convert(batch)
    assert padded["negatives_segment_ids"].ndim == 3
    count = flops.train_step_flops(TINY_ENCODER, padded)
    assert count == flops.train_step_flops(TINY_ENCODER, packed) > 0
    # Each text costs what it costs embedded alone (plus its BOS; texts are shorter than rows).
    alone = sum(flops.encoder_forward_flops(TINY_ENCODER, np.ones((1, int(n) + 1)))
                for role in ("query", "positive", "negatives")
                for n in getattr(batch, role).lengths if n)
    assert count == 3 * alone


def test_peak_table_and_override():
    assert flops.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_flops_per_device("NVIDIA H200") == 989e12
    assert flops.peak_flops_per_device("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.peak_flops_per_device("NVIDIA B200") == 2250e12
    assert flops.peak_flops_per_device("TPU v5 lite") == 197e12
    assert flops.peak_flops_per_device("TPU v5") == 459e12
    assert flops.peak_flops_per_device("TPU v6 lite") == 918e12
    assert flops.peak_flops_per_device("TPU v4") == 275e12
    assert flops.peak_flops_per_device("cpu") is None
    assert flops.peak_flops_per_device("cpu", override=1e12) == 1e12
    with pytest.raises(ValueError, match="peak_flops_per_device"):
        flops.peak_flops_per_device("cpu", override=0)


def test_console_line_shows_mfu_with_a_peak():
    lines = []
    logger = metrics_writer.ConsoleLogger(total_steps=10, every=2, print_fn=lines.append,
                                          peak_flops=1e9)
    logger.start(0)
    logger.add_tokens(100)
    logger.add_flops(10**6)
    rates = logger.maybe_log(2, {"loss": 1.0})
    assert "MFU " in lines[0] and "tokens/s" in lines[0]
    assert rates["mfu"] > 0
    without = []
    logger = metrics_writer.ConsoleLogger(total_steps=10, every=2, print_fn=without.append)
    logger.start(0)
    logger.add_flops(10**6)
    assert "mfu" not in logger.maybe_log(2, {"loss": 1.0}) and "MFU" not in without[0]


def test_a_run_logs_mfu_with_a_given_peak(tmp_path, capsys):
    from helpers import LOSS, OPTIMIZER, SMALL, partitioner_for, synthetic

    from gemb.train import run

    run.train(model_dir=str(tmp_path), encoder=SMALL, data=synthetic(batch_size=8),
              num_steps=2, log_every=1, loss=LOSS, optimizer=OPTIMIZER,
              partitioner=lambda: partitioner_for((-1, 1, 1), 1),
              peak_flops_per_device=1e12)
    out = capsys.readouterr().out
    assert "MFU not reported" not in out
    # Step 1 compiles and is kept out of the rates; step 2 has them.
    assert [line for line in out.splitlines() if line.startswith("step 2/2") and "MFU " in line]
    assert len(metrics_writer.read_scalars(tmp_path / "train")["train/mfu"]) == 1
