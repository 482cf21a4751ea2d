"""A converted model folder: config + orbax params + tokenizer, loaded in seconds.

Layout of DIR (written once by `gemb convert`, read by embed, eval and train's init_from):
  gemb_model.json   the EncoderConfig, where the weights came from, the head's init seed
  params/           orbax checkpoint of {"transformer": ..., "head": ...} in gemb's layout
  tokenizer.model   SentencePiece model (or tokenizer.json for tokenizer.json sources)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from gemb import distributed, paths
from gemb.models.config import AttentionType, EncoderConfig, TransformerConfig

CONFIG_FILENAME = "gemb_model.json"
PARAMS_DIRNAME = "params"
TOKENIZER_FILENAMES = ("tokenizer.model", "tokenizer.json")


def encoder_config_to_dict(config: EncoderConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    data["transformer"]["attention_pattern"] = [t.value for t in config.transformer.attention_pattern]
    return data


def encoder_config_from_dict(data: dict[str, Any]) -> EncoderConfig:
    transformer = dict(data["transformer"])
    transformer["attention_pattern"] = tuple(AttentionType(t) for t in transformer["attention_pattern"])
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = set(transformer) - fields
    if unknown:
        raise ValueError(f"model config has unknown transformer fields {sorted(unknown)}; it was "
                         "written by a newer gemb.")
    rest = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k != "transformer"}
    return EncoderConfig(transformer=TransformerConfig(**transformer), **rest)


CHUNK_BYTES = 16 * 2**20


def _savable(value):
    """What orbax can save: global jax.Arrays as they are, anything else as numpy. In a
    multi-process job an array on this process's devices alone (a head initialised by each
    process, a converted upstream weight) is the same on every process; orbax refuses such
    host-local arrays, and as numpy it is written once, by process 0."""
    if isinstance(value, jax.Array) and not (value.is_fully_addressable
                                             and jax.process_count() > 1):
        return value
    return np.asarray(value)


def save_model_dir(out_dir: str | os.PathLike, config: EncoderConfig, params: Any,
                   metadata: dict[str, Any]) -> Path | epath.Path:
    """Writes a model folder. `params` are numpy arrays or jax.Arrays; sharded jax.Arrays are
    written shard by shard (in a multi-process job every process calls this, each writes its
    own shards, and process 0 writes the config), so no host gathers the whole tree."""
    out_dir = paths.absolute(out_dir)
    params_dir = out_dir / PARAMS_DIRNAME
    if params_dir.exists():
        raise FileExistsError(f"{params_dir} already exists; choose a new --out folder or delete it.")
    out_dir.mkdir(parents=True, exist_ok=True)
    params = jax.tree_util.tree_map(_savable, params)
    # Stored in chunks of at most CHUNK_BYTES: a process that loads only its shards of a big
    # matrix (init_from on a sharded mesh) then reads those chunks, not the whole array.
    save_args = jax.tree_util.tree_map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES),
                                       params)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_dir, params, save_args=save_args)
    checkpointer.wait_until_finished()
    if distributed.is_chief():
        record = {"encoder": encoder_config_to_dict(config), **metadata}
        (out_dir / CONFIG_FILENAME).write_text(json.dumps(record, indent=2) + "\n")
    distributed.sync_processes(f"gemb model folder {out_dir}")
    return out_dir


def read_model_config(model_dir: str | os.PathLike) -> tuple[EncoderConfig, dict[str, Any]]:
    model_dir = paths.as_path(model_dir)
    config_file = model_dir / CONFIG_FILENAME
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a gemb model folder (no {CONFIG_FILENAME}); create one with "
            "`gemb convert --from FILE_OR_DIR --out DIR`.")
    record = json.loads(config_file.read_text())
    return encoder_config_from_dict(record["encoder"]), record


def load_params(model_dir: str | os.PathLike, abstract_params: Any | None = None) -> Any:
    """Restore params; with abstract_params (ShapeDtypeStructs carrying shardings) they are
    restored directly into that placement, e.g. sharded over a mesh."""
    params_dir = paths.absolute(model_dir) / PARAMS_DIRNAME
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{params_dir} is missing; the model folder is incomplete. "
                                "Convert the model again with `gemb convert`.")
    checkpointer = ocp.StandardCheckpointer()
    try:
        if abstract_params is None:
            # Onto this process's first device: a folder written from sharded arrays (another
            # mesh, other processes) records their topology, which this one need not have.
            local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            saved = ocp.PyTreeCheckpointer().metadata(params_dir).item_metadata.tree
            abstract_params = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local), saved)
        return checkpointer.restore(params_dir, abstract_params)
    except Exception as error:
        raise ValueError(
            f"Cannot restore parameters from {params_dir} ({type(error).__name__}: {error}). "
            "The checkpoint is damaged or belongs to another model; convert it again.") from error


def copy_tokenizer(source_dir: str | os.PathLike | None, out_dir: str | os.PathLike) -> bool:
    """Copies the tokenizer files of a model folder or run directory; False when it has none."""
    if source_dir is None:
        return False
    found = False
    source_dir, out_dir = paths.absolute(source_dir), paths.absolute(out_dir)
    for name in TOKENIZER_FILENAMES:
        source, target = source_dir / name, out_dir / name
        if source.is_file():
            found = True
            if source != target:
                target.write_bytes(source.read_bytes())
    return found
