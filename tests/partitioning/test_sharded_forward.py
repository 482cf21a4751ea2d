"""Sharded forward == single-device forward on 8 fake CPU devices; shardings follow the rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from gemb.models import config, encoder
from gemb.partitioning import mesh as mesh_lib
from gemb.partitioning import partitioner as partitioner_lib

MESHES = {"data8": (8, 1, 1), "data2_fsdp4": (2, 4, 1), "data2_fsdp2_tensor2": (2, 2, 2)}
ONE_KV_HEAD_TINY = config.TINY.replace(name="tiny_one_kv_head", num_kv_heads=1)


def _init(encoder_config):
    model = encoder.Encoder(encoder_config)
    boxed = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, boxed


def _batch():
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (8, 24), 4, 512), np.int32)
    lengths = np.array([24, 5, 17, 9, 24, 12, 3, 20])
    segments = (np.arange(24)[None] < lengths[:, None]).astype(np.int32)
    return tokens, segments


def _sharded_forward(model, boxed, partitioner, tokens, segments):
    params = jax.device_put(nn.unbox(boxed), nn.unbox(partitioner.param_shardings(boxed)))

    @jax.jit
    def forward(p, t, s):
        with partitioner.activation_context():
            return model.apply({"params": p}, t, s)

    return forward(params, *partitioner.place_batch((tokens, segments))), params


@pytest.mark.parametrize("transformer", [config.TINY, ONE_KV_HEAD_TINY], ids=["tiny", "one_kv_head"])
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_forward_equals_single_device(mesh_name, transformer):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    model, boxed = _init(config.TINY_ENCODER.replace(transformer=transformer))
    tokens, segments = _batch()
    reference = model.apply({"params": nn.unbox(boxed)}, tokens, segments)
    partitioner = partitioner_lib.Partitioner(mesh_lib.create_mesh(MESHES[mesh_name]))
    out, params = _sharded_forward(model, boxed, partitioner, tokens, segments)
    for key in ("pooled", "projected"):
        np.testing.assert_allclose(out[key], reference[key], atol=1e-5, rtol=1e-5)
    # The batch really is split over the data axes, and the params are really sharded.
    sharded_tokens = partitioner.place_batch(tokens)
    data_shards = MESHES[mesh_name][0] * MESHES[mesh_name][1]
    assert len({str(s.index) for s in sharded_tokens.addressable_shards}) == data_shards
    embedding = params["transformer"]["embedder"]["input_embedding"]
    expected_shards = MESHES[mesh_name][1] * MESHES[mesh_name][2]
    assert len({str(s.index) for s in embedding.addressable_shards}) == expected_shards


def test_parameter_shardings_follow_the_rules_table():
    _, boxed = _init(config.TINY_ENCODER)
    partitioner = partitioner_lib.Partitioner(mesh_lib.create_mesh((2, 2, 2)))
    specs = jax.tree_util.tree_map(lambda s: s.spec, nn.unbox(partitioner.param_shardings(boxed)))
    transformer = specs["transformer"]
    assert transformer["embedder"]["input_embedding"] == P("tensor", "fsdp")  # vocab, embed
    scanned = transformer["scanned_layers"]["layer_0"]
    assert scanned["attn"]["q_einsum"]["w"] == P(None, "tensor", "fsdp", None)  # layers, heads, embed, head_dim
    assert scanned["attn"]["kv_einsum"]["w"] == P(None, None, "tensor", "fsdp", None)
    assert scanned["attn"]["attn_vec_einsum"]["w"] == P(None, "tensor", None, "fsdp")
    assert scanned["mlp"]["gating_einsum"] == P(None, None, "tensor", "fsdp")
    assert scanned["mlp"]["linear"] == P(None, "tensor", "fsdp")
    assert scanned["pre_attention_norm"]["scale"] == P(None, None)
    assert transformer["layer_6"]["mlp"]["linear"] == P("tensor", "fsdp")
    assert specs["head"]["dense_0"] == P("fsdp", "tensor")


@pytest.mark.parametrize("preset", [config.GEMMA3_270M, config.GEMMA3_1B])
def test_one_kv_head_presets_resolve_under_tensor_parallelism(preset):
    """Full-size 270M / 1B: the single kv head is replicated, everything else shards."""
    model = encoder.Encoder(config.EncoderConfig(transformer=preset))
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    partitioner = partitioner_lib.Partitioner(mesh_lib.create_mesh((1, 2, 4)))
    specs = jax.tree_util.tree_map(lambda s: s.spec, nn.unbox(partitioner.param_shardings(boxed)))
    kv = specs["transformer"]["scanned_layers"]["layer_0"]["attn"]["kv_einsum"]["w"]
    q = specs["transformer"]["scanned_layers"]["layer_0"]["attn"]["q_einsum"]["w"]
    assert kv == P(None, None, None, "fsdp", None)
    assert q == P(None, "tensor", "fsdp", None)


def test_a_mesh_that_cannot_shard_the_model_is_named():
    odd = config.TINY_ENCODER.replace(transformer=config.TINY.replace(name="odd", embed_dim=60),
                                      head_dims=(96,))
    _, boxed = _init(odd)
    partitioner = partitioner_lib.Partitioner(mesh_lib.create_mesh((1, 8, 1)))
    with pytest.raises(ValueError, match=r"'embed' of size 60 cannot be split over mesh axes \('fsdp',\)"):
        partitioner.param_shardings(boxed)


def test_mesh_errors_name_the_numbers():
    with pytest.raises(ValueError, match="needs 12 devices but 8"):
        mesh_lib.create_mesh((3, 2, 2))
    with pytest.raises(ValueError, match="not a multiple of 3"):
        mesh_lib.create_mesh((-1, 3, 1))
    with pytest.raises(ValueError, match="only one axis may be -1"):
        mesh_lib.create_mesh((-1, -1, 1))
    assert dict(mesh_lib.create_mesh({"fsdp": 2, "data": -1}).shape) == {"data": 4, "fsdp": 2, "tensor": 1}


def test_indivisible_batch_is_named():
    partitioner = partitioner_lib.Partitioner(mesh_lib.create_mesh((2, 2, 2)))
    with pytest.raises(ValueError, match="global batch of 6 cannot be split"):
        partitioner.place_batch(np.zeros((6, 4), np.int32))


def test_activation_constraints_resolve_through_the_partitioner():
    """Activations take the parameters' resolver: an indivisible dimension (3 heads over 2
    tensor shards, a batch of 6 over 4 data shards) is left replicated, not an error."""
    from jax.sharding import PartitionSpec as P

    partitioner = partitioner_lib.Partitioner(mesh_lib.create_mesh((2, 2, 2)))
    names = ("act_batch", "act_length", "act_heads", None)
    assert partitioner.activation_spec(names, (8, 5, 4, 16)) == P(("data", "fsdp"), None, "tensor", None)
    assert partitioner.activation_spec(names, (8, 5, 3, 16)) == P(("data", "fsdp"), None, None, None)
    assert partitioner.activation_spec(names, (6, 5, 4, 16)) == P(None, None, "tensor", None)

    def hinted(x):
        return partitioner_lib.constrain(x, names)

    x = np.zeros((8, 5, 4, 16), np.float32)
    with partitioner.activation_context():
        inside = jax.jit(hinted)(x)
    expected = jax.sharding.NamedSharding(partitioner.mesh, P(("data", "fsdp"), None, "tensor"))
    assert inside.sharding.is_equivalent_to(expected, x.ndim)
    outside = jax.jit(lambda x: partitioner_lib.constrain(x, names))(x)  # no context: no hint
    assert outside.sharding.is_fully_replicated


@pytest.mark.parametrize("backend", ["splash", "pallas_gpu", "blockwise"])
def test_sharded_attention_kernels_equal_single_device_dense(backend):
    """The kernels XLA cannot partition run per batch shard (shard_map) under a Partitioner;
    sharded on (data 2, fsdp 2, tensor 2) they equal the dense backend on one device. The
    Pallas kernels run in interpret mode on CPU."""
    from gemb.models import attention_backends

    dense = config.TINY_ENCODER.replace(transformer=config.TINY.replace(attention_backend="xla"))
    model, boxed = _init(dense)
    tokens, segments = _batch()
    reference = model.apply({"params": nn.unbox(boxed)}, tokens, segments)
    kernel_model = encoder.Encoder(dense.replace(
        transformer=dense.transformer.replace(attention_backend=backend,
                                              attention_block_size=8)))
    partitioner = partitioner_lib.Partitioner(mesh_lib.create_mesh(MESHES["data2_fsdp2_tensor2"]))
    with attention_backends.interpret_kernels():
        out, _ = _sharded_forward(kernel_model, boxed, partitioner, tokens, segments)
    np.testing.assert_allclose(out["projected"], reference["projected"], atol=1e-5, rtol=1e-5)
