"""Everything gin files may name, registered here and nowhere else.

gin reaches the library only through the top-level objects it builds here (docs/design.md,
convention 4): the run (`train`), the model (`encoder_config`), the data (`SeqioData`,
`SyntheticData` with their `FeatureConverterConfig`, `QualityPolicy` and `PromptTemplate`),
the mesh (`partitioner`), the optimiser, loss, step and checkpoint configs, the evaluation hook
(`EvalHook`), and `converted_model` (a model folder converted on first use). Library modules
import no gin; their knobs are fields of these objects.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Mapping, Optional, Sequence

import gin

from gemb import paths
from gemb.data.feature_converter import FeatureConverterConfig
from gemb.data.quality import QualityPolicy
from gemb.data.streaming import StreamOrder
from gemb.data.templates import PromptTemplate
from gemb.eval.hook import EvalHook
from gemb.losses import ContrastiveLossConfig
from gemb.models import config as model_config
from gemb.train import checkpointing, data, optimizers, run, trainer

log = logging.getLogger(__name__)


def encoder_config(preset: str = gin.REQUIRED, head_dims: Sequence[int] = (3072,),
                   matryoshka_dims: Sequence[int] = (3072, 1536, 768), pooling: str = "mean",
                   dtype: str = "auto", param_dtype: str = "float32",
                   remat_policy: str = "none", scan_layers: bool = True,
                   **transformer_changes) -> model_config.EncoderConfig:
    """An EncoderConfig from a named preset (gemb.models.config) with changes.

    dtype is the compute dtype: 'auto' (the default) is bfloat16 on TPU and GPU and float32 on
    CPU (model_config.default_compute_dtype); with param_dtype 'float32' that is fp32 master
    weights and bf16 compute (docs/models.md, "Precision"). transformer_changes override other
    TransformerConfig fields (attention_backend, attention_block_size, ...).
    """
    if dtype == "auto":
        dtype = model_config.default_compute_dtype()
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
    """The model folder of an embedded model, converted into the cache on first use.

    Several processes may ask at once (a sweep's parallel runs, the processes of a job on a
    shared home directory): each converts into a folder of its own and renames it into place,
    and a process that finds the place taken uses the finished folder there.
    """
    from gemb.checkpoints import convert, model_dir

    out = paths.as_path(folder) if folder else paths.cache_dir() / "models" / name

    def complete() -> bool:
        return ((out / model_dir.CONFIG_FILENAME).is_file()
                and (out / model_dir.PARAMS_DIRNAME).is_dir())

    if complete():
        return str(out)
    if paths.is_remote(out):  # no atomic rename on object stores: convert in place
        if out.exists():
            log.warning("%s is incomplete; converting again", out)
            paths.rmtree(out)
        print(f"Converting {name} into {out} (once) ...", flush=True)
        convert.convert(name, out)
        return str(out)
    staging = out.parent / f".{out.name}.converting-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    print(f"Converting {name} into {out} (once) ...", flush=True)
    try:
        convert.convert(name, staging)
    except BaseException:  # a failed or interrupted conversion leaves no half folder behind
        if staging.exists():
            paths.rmtree(staging)
        raise
    if out.exists() and not complete():  # left by a crash of an older gemb: not in use
        log.warning("%s is incomplete; replacing it", out)
        paths.rmtree(out)
    try:
        os.rename(staging, out)
    except OSError:
        if not complete():
            raise
        log.info("%s was converted by another process meanwhile; using it", out)
        paths.rmtree(staging)
    return str(out)


_REGISTERED = False


def register() -> None:
    """Registers the configurables (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    gin.external_configurable(run.train, "train", denylist=["gin_config_text"])
    gin.external_configurable(encoder_config, "encoder_config")
    gin.external_configurable(partitioner, "partitioner")
    gin.external_configurable(converted_model, "converted_model")
    gin.external_configurable(optimizers.OptimizerConfig, "OptimizerConfig")
    gin.external_configurable(ContrastiveLossConfig, "ContrastiveLossConfig")
    gin.external_configurable(trainer.StepConfig, "StepConfig")
    gin.external_configurable(checkpointing.CheckpointConfig, "CheckpointConfig")
    gin.external_configurable(EvalHook, "EvalHook")
    gin.external_configurable(data.SyntheticData, "SyntheticData")
    gin.external_configurable(data.SeqioData, "SeqioData")
    gin.external_configurable(FeatureConverterConfig, "FeatureConverterConfig")
    gin.external_configurable(StreamOrder, "StreamOrder")
    gin.external_configurable(QualityPolicy, "QualityPolicy")
    gin.external_configurable(PromptTemplate, "PromptTemplate")
