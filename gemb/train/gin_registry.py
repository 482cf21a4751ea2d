"""Everything gin files may name, registered in one place (models stay gin-free).

Top-level objects only (DESIGN.md convention 4): the run (`train`), the model
(`encoder_config`), the data (`SeqioData`, `SyntheticData`, plus gemb.data's own configurables),
the partitioner (`partitioner`), the optimiser, loss, step and checkpoint configs, the eval hook
and its evaluators, and `converted_model` (a model folder converted on first use).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Optional, Sequence

import gin

from gemb import paths
from gemb.losses import ContrastiveLossConfig
from gemb.models import config as model_config
from gemb.train import checkpointing, data, metrics_writer, optimizers, trainer
from gemb.train import main as train_main  # noqa: F401  (registers `train`)

log = logging.getLogger(__name__)


def encoder_config(preset: str = gin.REQUIRED, head_dims: Sequence[int] = (3072,),
                   matryoshka_dims: Sequence[int] = (3072, 1536, 768), pooling: str = "mean",
                   dtype: str = "float32", param_dtype: str = "float32",
                   remat_policy: str = "none", scan_layers: bool = True,
                   **transformer_changes) -> model_config.EncoderConfig:
    """An EncoderConfig from a named preset (gemb.models.config) with changes.

    dtype is the compute dtype ('bfloat16' with param_dtype 'float32' = fp32 master weights,
    bf16 compute); transformer_changes override other TransformerConfig fields.
    """
    transformer = model_config.transformer_preset(preset).replace(
        dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy, scan_layers=scan_layers,
        **transformer_changes)
    return model_config.EncoderConfig(transformer=transformer, pooling=pooling,
                                      head_dims=tuple(head_dims),
                                      matryoshka_dims=tuple(matryoshka_dims))


def partitioner(ici_parallelism: Mapping[str, int] | Sequence[int] = (-1, 1, 1),
                dcn_parallelism: Mapping[str, int] | Sequence[int] = (1, 1, 1)):
    """The mesh over (data, fsdp, tensor); -1 = the rest of the devices."""
    from gemb.partitioning import mesh as mesh_lib
    from gemb.partitioning.partitioner import Partitioner

    return Partitioner(mesh_lib.create_mesh(ici_parallelism, dcn_parallelism))


def converted_model(name: str = "gemma3-270m", folder: Optional[str] = None) -> str:
    """The model folder of an embedded model, converted into the cache on first use."""
    from gemb.checkpoints import convert, model_dir

    out = Path(folder) if folder else paths.cache_dir() / "models" / name
    if (out / model_dir.CONFIG_FILENAME).is_file() and (out / model_dir.PARAMS_DIRNAME).is_dir():
        return str(out)
    if out.exists():
        log.warning("%s is incomplete; converting again", out)
        import shutil

        shutil.rmtree(out)
    print(f"Converting {name} into {out} (once) ...", flush=True)
    convert.convert(name, out)
    return str(out)


def docstring_code_retrieval(num_queries: int = 200, split: str = "test", seed: int = 0,
                             k_values: Sequence[int] = (1, 10)):
    """Evaluator: docstring -> code retrieval on held-out modules (see gemb.train.quickstart)."""
    from gemb.train import quickstart

    return quickstart.DocstringCodeRetrieval(num_queries=num_queries, split=split, seed=seed,
                                             k_values=tuple(k_values))


_REGISTERED = False


def register() -> None:
    """Registers the configurables (idempotent); gemb.data's are added when importable."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    gin.external_configurable(encoder_config, "encoder_config")
    gin.external_configurable(partitioner, "partitioner")
    gin.external_configurable(converted_model, "converted_model")
    gin.external_configurable(docstring_code_retrieval, "docstring_code_retrieval")
    gin.external_configurable(optimizers.OptimizerConfig, "OptimizerConfig")
    gin.external_configurable(ContrastiveLossConfig, "ContrastiveLossConfig")
    gin.external_configurable(trainer.StepConfig, "StepConfig")
    gin.external_configurable(checkpointing.CheckpointConfig, "CheckpointConfig")
    gin.external_configurable(metrics_writer.EvalHook, "EvalHook")
    gin.external_configurable(data.SyntheticData, "SyntheticData")
    gin.external_configurable(data.SeqioData, "SeqioData")
    try:  # gemb.data needs TensorFlow and seqio; accelerator hosts may lack them.
        from gemb.data import batching, feature_converter, mixtures, quality, tasks, templates  # noqa: F401
    except ImportError as error:
        log.info("gemb.data configurables not registered (%s)", error)
