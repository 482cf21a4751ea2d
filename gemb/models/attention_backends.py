"""The ways one attention layer can be computed; all give the same result on real tokens.

`Attention` (gemb/models/attention.py) projects queries, keys and values, then calls `attend`,
which runs the layer on the backend TransformerConfig.attention_backend names:

  xla        scores [B, K, G, T, S] in float32, masked, softmax: the reference. Memory grows
             with T * S per layer and local layers compute every score, then mask it.
  blockwise  plain JAX, any platform: queries in blocks of `attention_block_size`, each block
             scored only against the keys it can see (the whole row on a global layer, the
             band of the sliding window around the block on a local layer: blocks outside the
             window are never computed) and re-computed in the backward pass (jax.checkpoint),
             so a layer holds one block's scores instead of the whole T x S matrix.
  splash     TPU: the Pallas splash-attention kernel (jax.experimental.pallas.ops.tpu), with its
             LocalMask for the window, SegmentIds for packing and the MQA kernel per kv head.
             Block-sparse: fully masked blocks are skipped.
  pallas_gpu GPU: the Pallas/Triton flash-attention kernel (jax.experimental.pallas.ops.gpu)
             with segment ids, on global layers; local layers use the blockwise band (the
             kernel has no window).
  cudnn      GPU: cuDNN's fused attention through jax.nn.dot_product_attention, on global
             layers of padded rows (one example per row, tokens first: the feature
             converter's padded layout), where sequence lengths describe the mask; packed rows
             and bidirectional windows (which cuDNN refuses) use pallas_gpu / blockwise.
  auto       the best of these for the platform and row length (`resolve_backend`).

Outputs at padding positions (segment id 0) are unspecified and differ between backends;
nothing reads them (padding keys are masked for every real query and pooling skips padding).

The kernels (splash, pallas_gpu, cudnn) are custom calls XLA cannot partition, so under a
Partitioner they run per batch shard through shard_map (`_per_batch_shard`); their heads are
gathered over the tensor axis there.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from gemb.models.config import ATTENTION_BACKENDS as BACKENDS

# Finite, so a query whose keys are all masked gives a harmless uniform row, not NaN.
MASKED_LOGIT = -2.3819763e38

# Tests run the Pallas kernels on CPU through the Pallas interpreter.
_INTERPRET = contextvars.ContextVar("gemb_interpret_attention_kernels", default=False)


@contextlib.contextmanager
def interpret_kernels():
    """Within it, Pallas kernels (splash, pallas_gpu) run in interpret mode: slow, any platform
    (the CPU tests of the TPU / GPU kernels)."""
    token = _INTERPRET.set(True)
    try:
        yield
    finally:
        _INTERPRET.reset(token)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What one layer's attention allows, independent of how it is computed.

    window_reach: None on global layers; on local layers the largest |i - j| attended
      (bidirectional), or the largest i - j with j <= i (causal).
    """

    mode: str  # "bidirectional" or "causal"
    window_reach: int | None
    block_size: int = 512

    @property
    def left_reach(self) -> int | None:
        return self.window_reach

    @property
    def right_reach(self) -> int | None:
        if self.mode == "causal":
            return 0
        return self.window_reach


def resolve_backend(backend: str, spec: LayerSpec, packed: bool, length: int,
                    platform: str | None = None) -> str:
    """The backend that computes a layer on rows of `length`: `backend` itself, or what it
    falls back to where its kernel does not apply (see the module docstring), or for 'auto' the
    platform's best: on CPU the dense path for rows of one block (blockwise would be the same
    computation plus the backward's re-computation), blockwise for longer rows."""
    if backend not in BACKENDS:
        raise ValueError(f"attention_backend={backend!r}; choose one of {BACKENDS}.")
    platform = platform or jax.default_backend()
    if backend == "auto":
        if platform == "tpu":
            backend = "splash"
        elif platform in ("gpu", "cuda"):
            backend = "pallas_gpu" if packed else "cudnn"
        else:
            backend = "xla" if length <= spec.block_size else "blockwise"
    local = spec.window_reach is not None
    if backend == "pallas_gpu" and local:
        return "blockwise"
    if backend == "cudnn":
        if packed:
            return "blockwise" if local else "pallas_gpu"
        if local and spec.mode == "bidirectional":
            return "blockwise"
    return backend


def attend(query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array,
           spec: LayerSpec, backend: str, packed: bool = True,
           mask: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T + mask) v for one layer.

    query [B, T, N, H] (already scaled), key / value [B, S, K, H] with N a multiple of K
    (grouped-query attention), segment_ids [B, T] (0 = padding; self-attention, so S = T).
    packed: rows may hold several segments (static; the cudnn path needs False).
    mask: the xla backend's precomputed [B, T, S] boolean mask (built from segment_ids if None).
    Returns [B, T, N, H] in the dtype of `value`.
    """
    chosen = resolve_backend(backend, spec, packed, query.shape[1])
    if chosen == "xla":
        if mask is None:
            mask = layer_mask(segment_ids, spec)
        return xla_attention(query, key, value, mask)
    if chosen == "blockwise":
        return blockwise_attention(query, key, value, segment_ids, spec)
    kernel = {"splash": splash_attention, "pallas_gpu": pallas_gpu_attention,
              "cudnn": cudnn_attention}[chosen]
    return _per_batch_shard(functools.partial(kernel, spec=spec, interpret=_INTERPRET.get()),
                            query, key, value, segment_ids)


# ------------------------------------------------------------------------------------ masks


def allowed_keys(query_segments: jax.Array, key_segments: jax.Array, query_index: jax.Array,
                 key_index: jax.Array, spec: LayerSpec) -> jax.Array:
    """[B, t, s] bool: which keys each query attends (same segment, a real key, and the
    causal / window limits of the layer), for query and key positions given by their indices."""
    allowed = ((query_segments[:, :, None] == key_segments[:, None, :])
               & (key_segments != 0)[:, None, :])
    offset = query_index[:, None] - key_index[None, :]  # query index minus key index
    limits = jnp.ones(offset.shape, bool)
    if spec.mode == "causal":
        limits &= offset >= 0
    elif spec.mode != "bidirectional":
        raise ValueError(f"attention mode {spec.mode!r}; use 'bidirectional' or 'causal'.")
    if spec.window_reach is not None:
        limits &= (offset <= spec.window_reach) & (-offset <= spec.right_reach)
    return allowed & limits[None]


def layer_mask(segment_ids: jax.Array, spec: LayerSpec) -> jax.Array:
    index = jnp.arange(segment_ids.shape[1])
    return allowed_keys(segment_ids, segment_ids, index, index, spec)


# -------------------------------------------------------------------------------- xla (dense)


def _scores_softmax_values(grouped_query, key, value, allowed):
    """grouped_query [B, t, K, G, H], key / value [B, s, K, H], allowed [B, t, s]."""
    logits = jnp.einsum("btkgh,bskh->bkgts", grouped_query, key).astype(jnp.float32)
    logits = jnp.where(allowed[:, None, None, :, :], logits, MASKED_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, value)


def _grouped(query: jax.Array, num_kv_heads: int) -> jax.Array:
    batch, length, heads, head_dim = query.shape
    return query.reshape(batch, length, num_kv_heads, heads // num_kv_heads, head_dim)


def xla_attention(query, key, value, mask) -> jax.Array:
    batch, length, heads, head_dim = query.shape
    encoded = _scores_softmax_values(_grouped(query, key.shape[2]), key, value, mask)
    return encoded.reshape(batch, length, heads, head_dim)


# -------------------------------------------------------------------------------- blockwise


def _band_length(spec: LayerSpec, block: int, keys: int) -> int:
    """Keys a query block of `block` rows can see: the whole row on a global layer, the block
    plus the window's reach on each side on a local one (never more than the row)."""
    if spec.window_reach is None:
        return keys
    return min(keys, block + spec.left_reach + spec.right_reach)


def blockwise_attention(query, key, value, segment_ids, spec: LayerSpec) -> jax.Array:
    batch, length, heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    block = min(spec.block_size, length)
    num_blocks = -(-length // block)
    padded = num_blocks * block
    if padded != length:  # extra query rows of segment 0: computed, then dropped
        pad = [(0, 0), (0, padded - length)]
        query = jnp.pad(query, pad + [(0, 0), (0, 0)])
        query_segments = jnp.pad(segment_ids, pad)
    else:
        query_segments = segment_ids
    band = _band_length(spec, block, length)
    # Block b's queries are rows [b * block, (b + 1) * block); its keys the band starting at
    # the first key its first query can see, moved inside the row at the edges.
    block_starts = jnp.arange(num_blocks) * block
    band_starts = jnp.clip(block_starts - (spec.left_reach or 0), 0, length - band)

    query_blocks = jnp.moveaxis(
        _grouped(query, num_kv_heads).reshape(batch, num_blocks, block, num_kv_heads,
                                              heads // num_kv_heads, head_dim), 1, 0)
    query_segment_blocks = jnp.moveaxis(query_segments.reshape(batch, num_blocks, block), 1, 0)

    if band == length:
        # Every block sees every key: the keys stay shared instead of copied per block.
        def one_block(args):
            start, grouped_query, q_segments = args
            allowed = allowed_keys(q_segments, segment_ids, start + jnp.arange(block),
                                   jnp.arange(length), spec)
            return _scores_softmax_values(grouped_query, key, value, allowed)

        xs = (block_starts, query_blocks, query_segment_blocks)
    else:
        key_index = band_starts[:, None] + jnp.arange(band)[None, :]  # [blocks, band]
        key_bands = jnp.moveaxis(key[:, key_index], 1, 0)  # [blocks, B, band, K, H]
        value_bands = jnp.moveaxis(value[:, key_index], 1, 0)
        segment_bands = jnp.moveaxis(segment_ids[:, key_index], 1, 0)

        def one_block(args):
            start, band_start, grouped_query, q_segments, k, v, k_segments = args
            allowed = allowed_keys(q_segments, k_segments, start + jnp.arange(block),
                                   band_start + jnp.arange(band), spec)
            return _scores_softmax_values(grouped_query, k, v, allowed)

        xs = (block_starts, band_starts, query_blocks, query_segment_blocks, key_bands,
              value_bands, segment_bands)
    # Re-computed in the backward pass: only one block's scores are ever alive.
    encoded = jax.lax.map(jax.checkpoint(one_block, prevent_cse=False), xs)
    encoded = jnp.moveaxis(encoded, 0, 1).reshape(batch, padded, heads, head_dim)
    return encoded[:, :length]


# ------------------------------------------------------------------------------------ kernels


def _per_batch_shard(kernel: Callable, query, key, value, segment_ids) -> jax.Array:
    """kernel(query, key, value, segment_ids) on each batch shard (shard_map) under an active
    Partitioner, or directly without one."""
    from gemb.partitioning.partitioner import active_partitioner

    partitioner = active_partitioner()
    if partitioner is None:
        return kernel(query, key, value, segment_ids)
    batch_axes = partitioner.activation_spec(("act_batch",), query.shape[:1])[0]
    spec = jax.sharding.PartitionSpec(batch_axes)
    return jax.shard_map(kernel, mesh=partitioner.mesh, in_specs=(spec,) * 4, out_specs=spec,
                         check_vma=False)(query, key, value, segment_ids)


def _pad_length(multiple: int, query, key, value, segment_ids):
    """Rows padded to a multiple of `multiple` with segment-0 positions (never attended by a
    real query)."""
    length = query.shape[1]
    padded = -(-length // multiple) * multiple
    if padded == length:
        return query, key, value, segment_ids
    pad = [(0, 0), (0, padded - length)]
    return (jnp.pad(query, pad + [(0, 0), (0, 0)]), jnp.pad(key, pad + [(0, 0), (0, 0)]),
            jnp.pad(value, pad + [(0, 0), (0, 0)]), jnp.pad(segment_ids, pad))


def _largest_block(length: int, most: int) -> int:
    block = most
    while length % block:
        block //= 2
    return block


def splash_attention(query, key, value, segment_ids, *, spec: LayerSpec,
                     interpret: bool = False) -> jax.Array:
    """The TPU splash kernel: one MQA kernel per kv head (vmapped), per example (vmapped)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    batch, length, heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    groups = heads // num_kv_heads
    query, key, value, segment_ids = _pad_length(128, query, key, value, segment_ids)
    padded = query.shape[1]
    shape = (padded, padded)
    if spec.window_reach is not None:
        one_head = splash.LocalMask(shape, (spec.left_reach, spec.right_reach), offset=0)
    elif spec.mode == "causal":
        one_head = splash.CausalMask(shape)
    else:
        one_head = splash.FullMask(shape)
    # Blocks of 128 to 512 rows (the kernel's tiles), at most the config's block size.
    most = 128
    while most * 2 <= min(spec.block_size, 512):
        most *= 2
    block = _largest_block(padded, most)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mqa_single_device(
        splash.MultiHeadMask([one_head] * groups), block_sizes=sizes, interpret=interpret)
    # [B, T, K, G, H] -> [B, K, G, T, H]; keys [B, K, T, H].
    grouped = jnp.transpose(_grouped(query, num_kv_heads), (0, 2, 3, 1, 4))
    key = jnp.transpose(key, (0, 2, 1, 3))
    value = jnp.transpose(value, (0, 2, 1, 3))

    def one_example(q, k, v, segments):
        ids = splash.SegmentIds(q=segments, kv=segments)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(q, k, v)

    encoded = jax.vmap(one_example)(grouped, key, value, segment_ids.astype(jnp.int32))
    encoded = jnp.transpose(encoded, (0, 3, 1, 2, 4)).reshape(batch, padded, heads, head_dim)
    return encoded[:, :length].astype(value.dtype)


def pallas_gpu_attention(query, key, value, segment_ids, *, spec: LayerSpec,
                         interpret: bool = False) -> jax.Array:
    """The Pallas/Triton flash kernel (global layers; segment ids keep packed examples and
    padding apart)."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    if spec.window_reach is not None:
        raise ValueError("pallas_gpu has no sliding window; local layers use 'blockwise' "
                         "(resolve_backend does this).")
    length = query.shape[1]
    groups = query.shape[2] // key.shape[2]
    query, key, value, segment_ids = _pad_length(64, query, key, value, segment_ids)
    # The kernel is multi-head: every query head gets its kv head (a copy per group).
    key = jnp.repeat(key, groups, axis=2)
    value = jnp.repeat(value, groups, axis=2)
    block = _largest_block(query.shape[1], 64)
    sizes = gpu_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=32,
                                      block_kv_dkv=32, block_q_dq=32, block_kv_dq=32)
    encoded = gpu_attention.mha(query, key, value, segment_ids.astype(jnp.int32), sm_scale=1.0,
                                causal=spec.mode == "causal", block_sizes=sizes,
                                interpret=interpret)
    return encoded[:, :length]


def cudnn_attention(query, key, value, segment_ids, *, spec: LayerSpec,
                    interpret: bool = False) -> jax.Array:
    """cuDNN fused attention on padded rows: each row's tokens come first, so a length per
    row is the whole mask."""
    del interpret  # cuDNN has no interpreter; it runs on NVIDIA GPUs only
    lengths = jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
    window = None
    if spec.window_reach is not None:  # causal only (resolve_backend keeps bidirectional out)
        window = (spec.left_reach, spec.right_reach)
    return jax.nn.dot_product_attention(
        query, key, value, scale=1.0, is_causal=spec.mode == "causal",
        query_seq_lengths=lengths, key_value_seq_lengths=lengths, local_window_size=window,
        implementation="cudnn")
