"""One parameter tree for every source: upstream Gemma names, then gemb's scanned layout.

Every importer (GGUF, HF safetensors, Gemma orbax) first produces the *upstream tree*: nested
dicts of numpy arrays named as google-deepmind/gemma names them, one "layer_{i}" per layer.
`to_model_layout` then stacks the layers into the scanned periods the model uses; importing is a
rename plus a stack, never arithmetic on values (except the documented GGUF norm offset).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from gemb.models.config import TransformerConfig

Tree = dict[str, Any]


def expected_layer_shapes(config: TransformerConfig) -> Tree:
    d, f, n, k, h = (config.embed_dim, config.hidden_dim, config.num_heads, config.num_kv_heads,
                     config.head_dim)
    return {
        "pre_attention_norm": {"scale": (d,)},
        "attn": {
            "q_einsum": {"w": (n, d, h)},
            "kv_einsum": {"w": (2, k, d, h)},
            "attn_vec_einsum": {"w": (n, h, d)},
            "_query_norm": {"scale": (h,)},
            "_key_norm": {"scale": (h,)},
        },
        "post_attention_norm": {"scale": (d,)},
        "pre_ffw_norm": {"scale": (d,)},
        "mlp": {"gating_einsum": (2, f, d), "linear": (f, d)},
        "post_ffw_norm": {"scale": (d,)},
    }


def expected_upstream_shapes(config: TransformerConfig) -> Tree:
    tree: Tree = {"embedder": {"input_embedding": (config.vocab_size, config.embed_dim)},
                  "final_norm": {"scale": (config.embed_dim,)}}
    for i in range(config.num_layers):
        tree[f"layer_{i}"] = expected_layer_shapes(config)
    return tree


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def check_upstream_tree(tree: Tree, config: TransformerConfig, source: str) -> None:
    """Raise a ValueError listing every missing, unexpected or mis-shaped parameter."""
    expected = _flatten(expected_upstream_shapes(config))
    actual = {path: tuple(np.shape(v)) for path, v in _flatten(tree).items()}
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    wrong = [f"{p}: {actual[p]} (preset {config.name} expects {expected[p]})"
             for p in sorted(set(expected) & set(actual)) if tuple(expected[p]) != actual[p]]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} parameters, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} parameters the preset does not have, e.g. {unexpected[:3]}")
    if wrong:
        problems.append("shapes that do not match: " + "; ".join(wrong[:4]))
    if problems:
        raise ValueError(
            f"{source} does not fit model preset {config.name!r}: " + "; ".join(problems)
            + ". Pick the preset that matches the checkpoint (see gemb.models.config "
              "TRANSFORMER_PRESETS) or convert the right file.")


def to_model_layout(upstream: Tree, config: TransformerConfig) -> Tree:
    """Upstream per-layer tree -> the tree gemb.models.gemma3.Transformer uses."""
    period = len(config.attention_pattern)
    scanned_count = config.num_scanned_periods * period
    model: Tree = {"embedder": upstream["embedder"], "final_norm": upstream["final_norm"]}
    if config.num_scanned_periods:
        model["scanned_layers"] = {}
        for slot in range(period):
            members = [upstream[f"layer_{p * period + slot}"]
                       for p in range(config.num_scanned_periods)]
            model["scanned_layers"][f"layer_{slot}"] = _stack(members)
    for i in range(scanned_count, config.num_layers):
        model[f"layer_{i}"] = upstream[f"layer_{i}"]
    return model


def to_upstream_layout(model: Tree, config: TransformerConfig) -> Tree:
    """Inverse of to_model_layout (for exporting back to upstream names)."""
    period = len(config.attention_pattern)
    upstream: Tree = {"embedder": model["embedder"], "final_norm": model["final_norm"]}
    for slot in range(period if config.num_scanned_periods else 0):
        stacked = model["scanned_layers"][f"layer_{slot}"]
        for p in range(config.num_scanned_periods):
            upstream[f"layer_{p * period + slot}"] = _index(stacked, p)
    for i in range(config.num_scanned_periods * period, config.num_layers):
        upstream[f"layer_{i}"] = model[f"layer_{i}"]
    return upstream


def _stack(trees: list[Tree]) -> Tree:
    first = trees[0]
    if isinstance(first, Mapping):
        return {k: _stack([t[k] for t in trees]) for k in first}
    return np.stack([np.asarray(t) for t in trees])


def _index(tree: Tree, i: int) -> Tree:
    if isinstance(tree, Mapping):
        return {k: _index(v, i) for k, v in tree.items()}
    return tree[i]


def upstream_from_hf_names(tensors: Mapping[str, np.ndarray], config: TransformerConfig,
                           source: str) -> Tree:
    """HF Gemma 3 tensor names ([out, in] torch layout) -> the upstream tree.

    Accepts Gemma3ForCausalLM ("model.layers..."), Gemma3TextModel ("layers...") and the
    multimodal checkpoints' "language_model.model..." prefixes.
    """
    prefix = _find_prefix(tensors.keys(), source)
    get = lambda name: _take(tensors, prefix + name, source)  # noqa: E731
    d, n, k, h = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim
    tree: Tree = {"embedder": {"input_embedding": get("embed_tokens.weight")},
                  "final_norm": {"scale": get("norm.weight")}}
    for i in range(config.num_layers):
        p = f"layers.{i}."
        q = _reshape(get(p + "self_attn.q_proj.weight"), (n, h, d), p + "q_proj", config, source)
        kk = _reshape(get(p + "self_attn.k_proj.weight"), (k, h, d), p + "k_proj", config, source)
        v = _reshape(get(p + "self_attn.v_proj.weight"), (k, h, d), p + "v_proj", config, source)
        o = _reshape(get(p + "self_attn.o_proj.weight"), (d, n, h), p + "o_proj", config, source)
        tree[f"layer_{i}"] = {
            "pre_attention_norm": {"scale": get(p + "input_layernorm.weight")},
            "attn": {
                "q_einsum": {"w": q.transpose(0, 2, 1)},
                "kv_einsum": {"w": np.stack([kk.transpose(0, 2, 1), v.transpose(0, 2, 1)])},
                "attn_vec_einsum": {"w": o.transpose(1, 2, 0)},
                "_query_norm": {"scale": get(p + "self_attn.q_norm.weight")},
                "_key_norm": {"scale": get(p + "self_attn.k_norm.weight")},
            },
            "post_attention_norm": {"scale": get(p + "post_attention_layernorm.weight")},
            "pre_ffw_norm": {"scale": get(p + "pre_feedforward_layernorm.weight")},
            "mlp": {
                "gating_einsum": np.stack([get(p + "mlp.gate_proj.weight"),
                                           get(p + "mlp.up_proj.weight")]),
                "linear": get(p + "mlp.down_proj.weight").T,
            },
            "post_ffw_norm": {"scale": get(p + "post_feedforward_layernorm.weight")},
        }
    check_upstream_tree(tree, config, source)
    return tree


def hf_names_from_upstream(tree: Tree, config: TransformerConfig) -> dict[str, np.ndarray]:
    """The upstream tree -> HF Gemma3TextModel tensor names ([out, in] torch layout).

    The exact inverse of upstream_from_hf_names (without a prefix): exporting is a rename and a
    transpose, never arithmetic on values.
    """
    d, n, k, h = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim
    out = {"embed_tokens.weight": tree["embedder"]["input_embedding"],
           "norm.weight": tree["final_norm"]["scale"]}
    for i in range(config.num_layers):
        layer, p = tree[f"layer_{i}"], f"layers.{i}."
        attn, mlp = layer["attn"], layer["mlp"]
        kv = np.asarray(attn["kv_einsum"]["w"])  # [2, k, d, h]
        out.update({
            p + "input_layernorm.weight": layer["pre_attention_norm"]["scale"],
            p + "self_attn.q_proj.weight":
                np.asarray(attn["q_einsum"]["w"]).transpose(0, 2, 1).reshape(n * h, d),
            p + "self_attn.k_proj.weight": kv[0].transpose(0, 2, 1).reshape(k * h, d),
            p + "self_attn.v_proj.weight": kv[1].transpose(0, 2, 1).reshape(k * h, d),
            p + "self_attn.o_proj.weight":
                np.asarray(attn["attn_vec_einsum"]["w"]).transpose(2, 0, 1).reshape(d, n * h),
            p + "self_attn.q_norm.weight": attn["_query_norm"]["scale"],
            p + "self_attn.k_norm.weight": attn["_key_norm"]["scale"],
            p + "post_attention_layernorm.weight": layer["post_attention_norm"]["scale"],
            p + "pre_feedforward_layernorm.weight": layer["pre_ffw_norm"]["scale"],
            p + "mlp.gate_proj.weight": np.asarray(mlp["gating_einsum"])[0],
            p + "mlp.up_proj.weight": np.asarray(mlp["gating_einsum"])[1],
            p + "mlp.down_proj.weight": np.asarray(mlp["linear"]).T,
            p + "post_feedforward_layernorm.weight": layer["post_ffw_norm"]["scale"],
        })
    return {name: np.ascontiguousarray(np.asarray(value)) for name, value in out.items()}


_HF_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "")


def _find_prefix(names, source: str) -> str:
    names = set(names)
    for prefix in _HF_PREFIXES:
        if prefix + "embed_tokens.weight" in names:
            return prefix
    raise ValueError(
        f"{source} holds no Gemma 3 embedding table (looked for 'embed_tokens.weight' under "
        f"prefixes {list(_HF_PREFIXES)}); is it a Gemma 3 checkpoint?")


def _take(tensors: Mapping[str, np.ndarray], name: str, source: str) -> np.ndarray:
    try:
        return np.asarray(tensors[name])
    except KeyError:
        raise ValueError(f"{source} lacks tensor {name!r}; the checkpoint is incomplete or not a "
                         "Gemma 3 text model.") from None


def _reshape(array: np.ndarray, shape: tuple[int, ...], name: str, config: TransformerConfig,
             source: str) -> np.ndarray:
    if array.size != int(np.prod(shape)):
        raise ValueError(
            f"{source}: tensor {name} has shape {array.shape}, which cannot be the "
            f"{config.name} preset's {shape}; pick the preset that matches the checkpoint.")
    return array.reshape(shape)
