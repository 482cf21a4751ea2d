"""Model FLOPs of a train step, and the peak FLOP/s of a device: model FLOPs utilisation (MFU).

What is counted (the usual "model FLOPs" of MFU, as in the PaLM paper's appendix B):

  * every matmul with a weight, 2 x (matmul weights of the transformer) per real token: the q,
    k, v and output projections and the three MLP kernels of every layer. The embedding lookup
    is a gather (no FLOPs); RMSNorm scales, RoPE, softmax and GELU are not matmuls (all of them
    together are a few percent of the total);
  * attention: 4 x heads x head_dim per (query, key) pair a layer attends (2 for q.k, 2 for
    probs.v), with the pairs counted exactly from the segments of the batch: a global layer
    attends its whole segment (n^2 pairs; n(n+1)/2 causal), a local layer the keys within
    TransformerConfig.local_window_reach (|i - j| <= reach bidirectional, 0 <= i - j <= reach
    causal), cut at the segment's ends. Masked pairs an implementation computes anyway (padding,
    other segments of a packed row, keys outside the window of a dense XLA attention) are not
    useful work and are not counted;
  * the projection head: 2 x d_in x d_out per dense layer and example;
  * not counted: padding tokens, mean pooling (a one-hot einsum, 2 x S x D per token, under
    0.1%), the contrastive loss's similarity matmuls (2 x B x candidates x E per Matryoshka
    width, under 0.1% at the recipe's sizes) and the optimiser update.

A train step is 3 x the forward (the backward costs two matmuls per forward matmul: one for the
input's gradient, one for the weight's). These are MODEL FLOPs: work that recomputation adds is
not counted, neither remat's second forward (TransformerConfig.remat_policy) nor gradient
caching's extra forward (StepConfig.gradient_cache_chunk: embeddings without activations, then
every chunk again under vjp, 4 x the forward in all). MFU is then the share of the devices'
peak spent on the model's own arithmetic, comparable across those settings.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from gemb.models.config import AttentionType, EncoderConfig, TransformerConfig

ROLES = ("query", "positive", "negatives")  # the roles of gemb.data.feature_converter
TRAIN_FLOPS_PER_FORWARD_FLOP = 3  # forward + backward (input and weight gradients)

# Dense (no structured sparsity) bf16 matmul peak of ONE device, by the lower-cased
# jax Device.device_kind. Looked up by substring, first match wins, so the more specific
# spellings come first. Vendor figures:
#   TPU v4 275 TFLOP/s: cloud.google.com/tpu/docs/v4;  v5e 197: cloud.google.com/tpu/docs/v5e;
#   v5p 459: cloud.google.com/tpu/docs/v5p;  v6e (Trillium) 918: cloud.google.com/tpu/docs/v6e.
#   NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOP/s (624 "with sparsity"), SXM and PCIe.
#   NVIDIA H100 datasheet: BF16 1,979 / 1,671 / 1,513 TFLOP/s with sparsity for SXM / NVL /
#   PCIe, so 989 / 835 / 756 dense.  NVIDIA H200 datasheet: SXM 1,979 and NVL 1,671 with
#   sparsity, 989 / 835 dense.  NVIDIA HGX B200: FP16/BF16 4.5 PFLOP/s with sparsity per GPU,
#   2.25 dense.
# Vendor peaks are rarely reached by any matmul (an H200 measured 790 TFLOP/s on a large bf16
# matmul through JAX); train.peak_flops_per_device overrides the table, e.g. with a measured peak.
PEAK_BF16_FLOPS_BY_DEVICE_KIND: tuple[tuple[str, float], ...] = (
    ("tpu v6 lite", 918e12), ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),
    ("tpu v5p", 459e12), ("tpu v5", 459e12),  # jax calls a v5p "TPU v5"
    ("tpu v4", 275e12),
    ("b200", 2250e12),
    ("h200 nvl", 835e12), ("h200", 989e12),
    ("h100 nvl", 835e12), ("h100 pcie", 756e12), ("h100", 989e12),
    ("a100", 312e12),
)


def peak_flops_per_device(device_kind: str | None = None,
                          override: float | None = None) -> float | None:
    """bf16 dense peak FLOP/s of one device: `override` when given, else the table's entry for
    `device_kind` (default: jax's first device), else None (MFU cannot be reported)."""
    if override is not None:
        if not override > 0:
            raise ValueError(f"peak_flops_per_device={override!r} must be a positive FLOP/s "
                             "figure (e.g. 989e12 for an H100 SXM), or None to look the "
                             "device up.")
        return float(override)
    if device_kind is None:
        import jax

        device_kind = jax.devices()[0].device_kind
    kind = device_kind.lower()
    for pattern, peak in PEAK_BF16_FLOPS_BY_DEVICE_KIND:
        if pattern in kind:
            return peak
    return None


def matmul_weights(config: TransformerConfig) -> int:
    """Weights of the transformer's matmuls (no embedding table, no norm scales)."""
    d, h, kv, hd, f = (config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim,
                       config.hidden_dim)
    per_layer = 2 * d * h * hd + 2 * d * kv * hd + 3 * d * f  # q and out, k and v, MLP
    return config.num_layers * per_layer


def segment_lengths(segment_ids: np.ndarray) -> np.ndarray:
    """Tokens of every (row, segment) of a segment-id array [..., L] (0 = padding), as int64.

    The converter writes each segment as one contiguous run of its row, so a segment is the
    tokens of a row sharing an id."""
    segment_ids = np.asarray(segment_ids)
    rows = segment_ids.reshape(-1, segment_ids.shape[-1]) if segment_ids.ndim else segment_ids
    if rows.size == 0:
        return np.zeros(0, np.int64)
    real = rows != 0
    ids = rows.astype(np.int64)
    width = int(ids.max()) + 1
    keys = (np.arange(len(rows), dtype=np.int64)[:, None] * width + ids)[real]
    counts = np.bincount(keys)
    return counts[counts > 0].astype(np.int64)


def attended_pairs(lengths: np.ndarray, attention_type: AttentionType,
                   config: TransformerConfig) -> int:
    """(query, key) pairs one layer of `attention_type` attends, summed over segments of
    `lengths` tokens (the same pairs as gemb.models.attention.attention_masks allows)."""
    n = np.asarray(lengths, np.int64)
    causal = config.attention_mode == "causal"
    if attention_type == AttentionType.GLOBAL:
        pairs = n * (n + 1) // 2 if causal else n * n
    else:
        # Offsets d = 1..m with m = min(reach, n - 1): n - d pairs each (per side).
        m = np.minimum(config.local_window_reach, np.maximum(n - 1, 0))
        one_side = m * n - m * (m + 1) // 2
        pairs = n + (one_side if causal else 2 * one_side)
    return int(pairs.sum())


def encoder_forward_flops(encoder: EncoderConfig, segment_ids: np.ndarray) -> int:
    """Model FLOPs of one encoder forward over token rows with these segment ids [..., L]."""
    transformer = encoder.transformer
    lengths = segment_lengths(segment_ids)
    tokens = int(lengths.sum())
    flops = 2 * matmul_weights(transformer) * tokens
    per_pair = 4 * transformer.num_heads * transformer.head_dim
    for attention_type in transformer.layer_attention_types():
        flops += per_pair * attended_pairs(lengths, attention_type, transformer)
    widths = (transformer.embed_dim,) + tuple(encoder.head_dims)
    head_weights = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    return flops + 2 * head_weights * len(lengths)


def forward_flops(encoder: EncoderConfig, features: Mapping[str, np.ndarray]) -> int:
    """Model FLOPs of embedding every role of a feature dict (gemb.data.feature_converter:
    padded [B, L] / [B, K, L] or packed [R, L]; empty negative slots cost nothing)."""
    return sum(encoder_forward_flops(encoder, features[f"{role}_segment_ids"])
               for role in ROLES if f"{role}_segment_ids" in features)


def train_step_flops(encoder: EncoderConfig, features: Mapping[str, np.ndarray]) -> int:
    """Model FLOPs of one train step on a feature dict: 3 x its forward (module docstring:
    recomputation by remat or gradient caching is not counted)."""
    return TRAIN_FLOPS_PER_FORWARD_FLOP * forward_flops(encoder, features)


def model_flops_utilization(flops: float, seconds: float, peak_flops: float) -> float:
    """Share of `peak_flops` (FLOP/s of all devices that did the work) that `flops` model FLOPs
    in `seconds` achieved."""
    return flops / max(seconds, 1e-12) / peak_flops
