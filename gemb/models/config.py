"""Model sizes as frozen dataclasses with named presets.

Modules never read global flags: everything that shapes a model is in these configs, so a gin
file or a test picks a preset by name and gets the same model everywhere.

Gemma 3 dimensions are the published ones (Gemma 3 technical report, Table 1, and the released
configs): 262,144-token vocabulary, 5 local (sliding-window) layers to 1 global layer, QK-norm,
pre- and post-norms, gated GELU MLP, RoPE base 10k on local layers and 1M on global layers
(positions divided by 8 on the global layers of 4B and larger).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Literal


class AttentionType(enum.Enum):
    LOCAL_SLIDING = "local_sliding"
    GLOBAL = "global"


# Every 6th layer is global; the period is what the layer scan iterates over.
GEMMA3_ATTENTION_PATTERN = (AttentionType.LOCAL_SLIDING,) * 5 + (AttentionType.GLOBAL,)

RematPolicy = Literal["none", "full", "dots", "dots_with_no_batch_dims", "save_attn_out"]
AttentionBackend = Literal["auto", "xla", "blockwise", "splash", "pallas_gpu", "cudnn"]
ATTENTION_BACKENDS = ("auto", "xla", "blockwise", "splash", "pallas_gpu", "cudnn")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """The decoder LLM the encoder is built from (Gemma 3 family)."""

    name: str
    num_layers: int
    embed_dim: int
    hidden_dim: int  # MLP width
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int = 262_144
    sliding_window_size: int = 512
    attention_pattern: tuple[AttentionType, ...] = GEMMA3_ATTENTION_PATTERN
    local_rope_base: float = 10_000.0
    global_rope_base: float = 1_000_000.0
    global_rope_scale_factor: float = 1.0  # positions are divided by this on global layers
    # Queries are multiplied by query_pre_attn_scalar ** -0.5 (head_dim for most sizes).
    query_pre_attn_scalar: float = 256.0
    rms_norm_eps: float = 1e-6
    max_length: int = 32_768
    # "bidirectional" for the encoder (the recipe); "causal" for LM parity and decoding.
    attention_mode: Literal["bidirectional", "causal"] = "bidirectional"
    # How a local layer's window opens up when the mask becomes bidirectional. "split" keeps the
    # number of keys a query sees (about the window size) by reaching w // 2 tokens to each side,
    # |i - j| <= w // 2: EmbeddingGemma's trained setting and transformers' Gemma3 with
    # use_bidirectional_attention. "full" reaches w - 1 tokens to each side, |i - j| < w (twice
    # the keys the LM was trained with).
    bidirectional_window: Literal["split", "full"] = "split"
    # How attention scores are computed (gemb/models/attention_backends.py): "auto" picks the
    # platform's best (splash on TPU, cuDNN / Pallas flash + blockwise on GPU, blockwise for
    # rows longer than one block on CPU); "xla" is the dense reference.
    attention_backend: AttentionBackend = "auto"
    # Query rows per block of the blockwise backend: a layer holds one block's scores.
    attention_block_size: int = 512
    scan_layers: bool = True
    remat_policy: RematPolicy = "none"
    # Compute dtype of activations; parameters are kept in param_dtype (fp32 master weights).
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.name}: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}; grouped-query attention needs whole groups."
            )
        if self.bidirectional_window not in ("split", "full"):
            raise ValueError(f"{self.name}: bidirectional_window={self.bidirectional_window!r}; "
                             "use 'split' or 'full'.")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"{self.name}: attention_backend={self.attention_backend!r}; use "
                             f"one of {ATTENTION_BACKENDS}.")
        if self.attention_block_size < 1:
            raise ValueError(f"{self.name}: attention_block_size={self.attention_block_size} "
                             "must be a positive number of query rows.")
        if self.attention_mode not in ("bidirectional", "causal"):
            raise ValueError(
                f"{self.name}: attention_mode={self.attention_mode!r}; use 'bidirectional' or 'causal'."
            )

    def layer_attention_types(self) -> tuple[AttentionType, ...]:
        period = self.attention_pattern
        return tuple(period[i % len(period)] for i in range(self.num_layers))

    @property
    def num_scanned_periods(self) -> int:
        return self.num_layers // len(self.attention_pattern) if self.scan_layers else 0

    @property
    def num_remainder_layers(self) -> int:
        return self.num_layers - self.num_scanned_periods * len(self.attention_pattern)

    @property
    def local_window_reach(self) -> int:
        """Largest |i - j| a local layer attends over (one-sided reach in causal mode)."""
        if self.attention_mode == "bidirectional" and self.bidirectional_window == "split":
            return self.sliding_window_size // 2
        return self.sliding_window_size - 1

    @property
    def query_scale(self) -> float:
        return self.query_pre_attn_scalar**-0.5

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count of the transformer (the LM head is tied to the embedding)."""
        d, h, kv, hd, f = (self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim,
                           self.hidden_dim)
        attention = d * h * hd * 2 + d * kv * hd * 2 + 2 * hd  # q, out, k, v, qk-norm scales
        mlp = 3 * d * f
        norms = 4 * d
        total = self.num_layers * (attention + mlp + norms) + d  # + final norm
        return total + (self.vocab_size * d if include_embedding else 0)


GEMMA3_270M = TransformerConfig(
    name="gemma3_270m", num_layers=18, embed_dim=640, hidden_dim=2048, num_heads=4,
    num_kv_heads=1, head_dim=256, sliding_window_size=512, query_pre_attn_scalar=256.0,
)
GEMMA3_1B = TransformerConfig(
    name="gemma3_1b", num_layers=26, embed_dim=1152, hidden_dim=6 * 1152, num_heads=4,
    num_kv_heads=1, head_dim=256, sliding_window_size=512, query_pre_attn_scalar=256.0,
)
GEMMA3_4B = TransformerConfig(
    name="gemma3_4b", num_layers=34, embed_dim=2560, hidden_dim=2560 * 8 // 2, num_heads=8,
    num_kv_heads=4, head_dim=256, sliding_window_size=1024, global_rope_scale_factor=8.0,
    query_pre_attn_scalar=256.0,
)
GEMMA3_12B = TransformerConfig(
    name="gemma3_12b", num_layers=48, embed_dim=30 * 128, hidden_dim=8 * 30 * 128 // 2,
    num_heads=16, num_kv_heads=8, head_dim=256, sliding_window_size=1024,
    global_rope_scale_factor=8.0, query_pre_attn_scalar=256.0,
)
GEMMA3_27B = TransformerConfig(
    name="gemma3_27b", num_layers=62, embed_dim=5376, hidden_dim=5376 * 8 // 2, num_heads=32,
    num_kv_heads=16, head_dim=128, sliding_window_size=1024, global_rope_scale_factor=8.0,
    # The 27B model scales queries by (embed_dim / num_heads) ** -0.5 = 168 ** -0.5.
    query_pre_attn_scalar=5376 / 32,
)
# Small enough for CPU unit tests, yet it keeps every structural feature: grouped-query
# attention, both layer types, one full scanned period plus a remainder, and a sliding window
# shorter than the test sequences.
TINY = TransformerConfig(
    name="tiny", num_layers=8, embed_dim=64, hidden_dim=128, num_heads=4, num_kv_heads=2,
    head_dim=16, vocab_size=512, sliding_window_size=8, query_pre_attn_scalar=16.0,
    max_length=512,
)

TRANSFORMER_PRESETS: dict[str, TransformerConfig] = {
    c.name: c for c in (GEMMA3_270M, GEMMA3_1B, GEMMA3_4B, GEMMA3_12B, GEMMA3_27B, TINY)
}


def default_compute_dtype(platform: str | None = None) -> str:
    """bfloat16 on accelerators (their matrix units run bf16 at full rate; parameters, the
    optimizer state, norms, softmax and the loss stay float32), float32 on CPU (no bf16 speed-up,
    and the tests compare against float32 references)."""
    if platform is None:
        import jax

        platform = jax.default_backend()
    return "float32" if platform == "cpu" else "bfloat16"


def transformer_preset(name: str) -> TransformerConfig:
    try:
        return TRANSFORMER_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"Unknown model preset {name!r}; choose one of {sorted(TRANSFORMER_PRESETS)}."
        ) from None


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """The embedding model: transformer -> pooling -> projection head -> Matryoshka prefixes."""

    transformer: TransformerConfig = GEMMA3_270M
    pooling: Literal["mean", "last_token", "first_token"] = "mean"
    # Widths of the projection head's dense layers, applied in order. (3072,) is the Gemini
    # Embedding head (one linear d_model -> 3072); (3072, 768) is EmbeddingGemma's two dense
    # layers; () means no head (the pooled hidden state is the embedding).
    head_dims: tuple[int, ...] = (3072,)
    # Nested prefixes the loss and the outputs use, largest first or in any order.
    matryoshka_dims: tuple[int, ...] = (3072, 1536, 768)

    def __post_init__(self):
        if self.pooling not in ("mean", "last_token", "first_token"):
            raise ValueError(
                f"pooling={self.pooling!r}; use 'mean', 'last_token' or 'first_token'."
            )
        width = self.embedding_dim
        bad = [d for d in self.matryoshka_dims if not 0 < d <= width]
        if bad:
            raise ValueError(
                f"matryoshka_dims {bad} do not fit the embedding of width {width} "
                f"(head_dims={self.head_dims}); use prefixes between 1 and {width}."
            )
        if len(set(self.matryoshka_dims)) != len(self.matryoshka_dims):
            raise ValueError(f"matryoshka_dims {self.matryoshka_dims} repeat a width.")

    @property
    def embedding_dim(self) -> int:
        return self.head_dims[-1] if self.head_dims else self.transformer.embed_dim

    def replace(self, **changes) -> "EncoderConfig":
        return dataclasses.replace(self, **changes)


TINY_ENCODER = EncoderConfig(transformer=TINY, head_dims=(96,), matryoshka_dims=(96, 48, 24))
