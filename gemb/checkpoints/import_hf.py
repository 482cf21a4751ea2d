"""Import Gemma 3 weights from a Hugging Face folder of safetensors files.

Handles a single model.safetensors or shards listed in model.safetensors.index.json, in float32,
float16 or bfloat16 (read with ml_dtypes, so no torch is needed), and picks the gemb preset from
config.json (or from the tensor shapes when config.json is absent).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from gemb.checkpoints import layout
from gemb.models.config import TRANSFORMER_PRESETS, TransformerConfig

_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file as a numpy array (bf16 via ml_dtypes)."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path} is not a safetensors file (only {len(data)} bytes).")
    (header_size,) = struct.unpack("<Q", data[:8])
    if 8 + header_size > len(data):
        raise ValueError(f"{path} is truncated: its header claims {header_size} bytes but the file "
                         f"has {len(data) - 8}. Download or write it again.")
    try:
        header = json.loads(data[8:8 + header_size])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} has an unreadable safetensors header ({error}).") from error
    body = memoryview(data)[8 + header_size:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which gemb does not read.")
        start, end = info["data_offsets"]
        if end > len(body):
            raise ValueError(f"{path} is truncated: tensor {name} ends at byte {end} of a "
                             f"{len(body)}-byte body. Download or write it again.")
        array = np.frombuffer(body[start:end], dtype=_DTYPES[info["dtype"]])
        tensors[name] = array.reshape(info["shape"])
    return tensors


def read_hf_folder(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"HF checkpoint folder {folder} does not exist.")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors files; point --from at the folder "
                                "that has model.safetensors (or its shards and index).")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        shard = folder / name
        if not shard.is_file():
            raise FileNotFoundError(f"{index} lists shard {name}, which is missing from {folder}.")
        tensors.update(read_safetensors(shard))
    return tensors


def config_from_hf(folder: Path, tensors: dict[str, np.ndarray]) -> TransformerConfig:
    config_file = folder / "config.json"
    source = f"HF checkpoint {folder}"
    if config_file.is_file():
        hf = json.loads(config_file.read_text())
        hf = hf.get("text_config", hf)  # multimodal checkpoints nest the text model's config
        dims = {"num_layers": hf.get("num_hidden_layers"), "embed_dim": hf.get("hidden_size"),
                "hidden_dim": hf.get("intermediate_size"),
                "num_heads": hf.get("num_attention_heads"),
                "num_kv_heads": hf.get("num_key_value_heads"), "head_dim": hf.get("head_dim")}
    else:
        prefix = layout._find_prefix(tensors.keys(), source)
        vocab, embed = tensors[prefix + "embed_tokens.weight"].shape
        layers = 1 + max(int(k[len(prefix):].split(".")[1]) for k in tensors
                         if k.startswith(prefix + "layers."))
        q_norm = tensors[prefix + "layers.0.self_attn.q_norm.weight"].shape[0]
        dims = {"num_layers": layers, "embed_dim": embed,
                "hidden_dim": tensors[prefix + "layers.0.mlp.gate_proj.weight"].shape[0],
                "num_heads": tensors[prefix + "layers.0.self_attn.q_proj.weight"].shape[0] // q_norm,
                "num_kv_heads": tensors[prefix + "layers.0.self_attn.k_proj.weight"].shape[0] // q_norm,
                "head_dim": q_norm}
    for preset in TRANSFORMER_PRESETS.values():
        if all(getattr(preset, k) == v for k, v in dims.items()):
            return preset
    raise ValueError(f"{source}: no gemb preset has dimensions {dims}; add one to "
                     "gemb/models/config.py or pass the matching preset explicitly.")


def load_hf(folder: str | os.PathLike, config: TransformerConfig | None = None
            ) -> tuple[TransformerConfig, layout.Tree]:
    """(preset, upstream param tree in float32) from an HF Gemma 3 safetensors folder."""
    folder = Path(folder)
    tensors = read_hf_folder(folder)
    config = config or config_from_hf(folder, tensors)
    tensors = {k: v.astype(np.float32) for k, v in tensors.items()
               if np.issubdtype(v.dtype, np.floating) or v.dtype == ml_dtypes.bfloat16}
    return config, layout.upstream_from_hf_names(tensors, config, f"HF checkpoint {folder}")
