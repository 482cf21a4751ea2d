"""A gemb model's transformer as a Hugging Face Gemma3TextModel folder.

config.json + model.safetensors + the tokenizer, loadable with
`transformers.AutoModel.from_pretrained(DIR)` and therefore by sentence-transformers. Writing
needs neither torch nor transformers: safetensors is a JSON header and raw little-endian bytes.

gemb's bidirectional attention with bidirectional_window="split" (|i - j| <= w // 2 on local
layers) is exactly transformers' `use_bidirectional_attention=True`; causal mode maps to False.
The "full" window (|i - j| < w) has no transformers equivalent and is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

from gemb import paths
from gemb.checkpoints import layout
from gemb.models.config import AttentionType, TransformerConfig

_SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                       np.dtype(ml_dtypes.bfloat16): "BF16"}
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """One .safetensors file (the inverse of gemb.checkpoints.import_hf.read_safetensors)."""
    path = paths.as_path(path)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name} has dtype {array.dtype}; export float32, float16 or "
                             "bfloat16.")
        header[name] = {"dtype": _SAFETENSORS_DTYPES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the body to 8 bytes
    # Locally written beside, then renamed: a killed export never leaves a truncated
    # model.safetensors. An object on gs:// appears only when complete, so it is written in place.
    partial = path if paths.is_remote(path) else path.with_suffix(".partial")
    with partial.open("wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for array in arrays:
            handle.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    if partial != path:
        partial.replace(path)
    return path


def hf_text_config(config: TransformerConfig, dtype: str = "float32") -> dict:
    """config.json of the equivalent transformers Gemma3TextModel."""
    if config.attention_mode == "bidirectional" and config.bidirectional_window != "split":
        raise ValueError(
            f"bidirectional_window={config.bidirectional_window!r} has no transformers "
            "equivalent (use_bidirectional_attention reaches w // 2 to each side, gemb's 'split'); "
            "export a model trained with bidirectional_window='split'.")
    layer_types = [
        "full_attention" if config.attention_pattern[i % len(config.attention_pattern)]
        == AttentionType.GLOBAL else "sliding_attention" for i in range(config.num_layers)]
    global_rope = {"rope_type": "default", "rope_theta": config.global_rope_base}
    if config.global_rope_scale_factor != 1.0:
        global_rope = {"rope_type": "linear", "rope_theta": config.global_rope_base,
                       "factor": config.global_rope_scale_factor}
    query_scalar = config.query_pre_attn_scalar
    return {
        "architectures": ["Gemma3TextModel"],
        "model_type": "gemma3_text",
        "vocab_size": config.vocab_size,
        "hidden_size": config.embed_dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": config.max_length,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": {"sliding_attention": {"rope_type": "default",
                                                  "rope_theta": config.local_rope_base},
                            "full_attention": global_rope},
        "query_pre_attn_scalar": int(query_scalar) if float(query_scalar).is_integer()
        else query_scalar,
        "sliding_window": config.sliding_window_size,
        "layer_types": layer_types,
        "use_bidirectional_attention": config.attention_mode == "bidirectional",
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
        "dtype": dtype,
    }


def write_hf_tokenizer(model_dir: Path, out_dir: Path, max_length: int) -> None:
    """Tokenizer files that make transformers tokenise as gemb does: BOS first, no EOS, and (for
    a SentencePiece model) special-token text such as "<eos>" in a document is plain text."""
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>",
              "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
              "model_max_length": max_length}
    if (model_dir / "tokenizer.model").is_file():
        (out_dir / "tokenizer.model").write_bytes((model_dir / "tokenizer.model").read_bytes())
        # SentencePiece never matches control pieces in text; transformers would, unless told.
        config.update(tokenizer_class="GemmaTokenizer", split_special_tokens=True)
    elif (model_dir / "tokenizer.json").is_file():
        from gemb.tokenizer import Tokenizer

        bos_id = Tokenizer(model_dir / "tokenizer.json").bos_id
        data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        bos = next((t["content"] for t in data.get("added_tokens", []) if t["id"] == bos_id),
                   "<bos>")
        # gemb puts BOS first itself and ignores the file's post-processor; transformers uses the
        # post-processor, so it is made to do the same.
        data["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
        (out_dir / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False),
                                                encoding="utf-8")
        config.update(tokenizer_class="PreTrainedTokenizerFast", bos_token=bos)
        # transformers matches every special token it is told of in text; gemb (the tokenizers
        # library) only those the file itself declares. Name only the declared ones, and the
        # padding token, without which transformers cannot batch.
        declared = {t["content"] for t in data.get("added_tokens", [])}
        for key in ("bos_token", "eos_token", "unk_token"):
            if config[key] not in declared:
                del config[key]
    else:
        raise FileNotFoundError(f"{model_dir} has no tokenizer.model or tokenizer.json to export.")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_hf_model(out_dir: Path, config: TransformerConfig, transformer_params,
                   dtype: str = "float32") -> None:
    """config.json + model.safetensors of the transformer (params in gemb's layout)."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r}; export one of {sorted(EXPORT_DTYPES)}.")
    upstream = layout.to_upstream_layout(transformer_params, config)
    tensors = {name: np.asarray(value, np.float32).astype(EXPORT_DTYPES[dtype])
               for name, value in layout.hf_names_from_upstream(upstream, config).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(out_dir / "model.safetensors", tensors)
    (out_dir / "config.json").write_text(json.dumps(hf_text_config(config, dtype), indent=2) + "\n")
