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
import threading
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

# orbax saves from several threads of one process interfere (the CI run of 5616adf hung 300 s in
# orbax's futures; locally threads failed with 'File exists' on their own staging folders), so a
# process converts one model at a time; other jobs are handled by the staging rename.
_CONVERSION_LOCK = threading.Lock()


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

    Several jobs may ask at once (a sweep's parallel runs, the quickstart beside another gemb
    command): each converts into a staging folder of its own and renames it into place, and a
    job that finds the place taken uses the finished folder there. The processes of one job
    convert together into one staging folder (every process writes its part, as any multi-host
    save) and process 0 renames it, so the folder must be on storage they all see (a gs:// path
    or a shared mount; GEMB_CACHE). Threads of one process convert one at a time.
    """
    from gemb import distributed

    out = paths.as_path(folder) if folder else paths.cache_dir() / "models" / name
    # A collective: the processes of a job convert together or not at all.
    if distributed.all_processes_agree(_is_model_folder(out)):
        return str(out)
    with _CONVERSION_LOCK:
        if not distributed.all_processes_agree(_is_model_folder(out)):
            _convert_into_place(name, out)
    return str(out)


def _is_model_folder(out) -> bool:
    from gemb.checkpoints import model_dir

    return ((out / model_dir.CONFIG_FILENAME).is_file()
            and (out / model_dir.PARAMS_DIRNAME).is_dir())


def _convert_into_place(name: str, out) -> None:
    from gemb import distributed
    from gemb.checkpoints import convert

    if paths.is_remote(out):  # no atomic rename on object stores: convert in place
        if distributed.is_chief() and out.exists():
            log.warning("%s is incomplete; converting again", out)
            paths.rmtree(out)
        distributed.sync_processes(f"gemb converted_model cleared {out}")
        target = out
    else:
        # One name for the whole job, drawn by process 0: its pid and a random number.
        chief_pid, token = distributed.chief_integers(
            (os.getpid(), uuid.uuid4().int % 2**31))
        target = out.parent / f".{out.name}.converting-{chief_pid}-{token:08x}"
    print(f"Converting {name} into {out} (once) ...", flush=True)
    try:
        convert.convert(name, target)
    except BaseException:  # a failed or interrupted conversion leaves no half folder behind
        if distributed.is_chief() and target.exists():
            paths.rmtree(target)
        raise
    rename_error = None
    if target != out and distributed.is_chief():
        try:
            _rename_into_place(target, out)
        except OSError as error:  # raised after the other processes were let go
            rename_error = error
    distributed.sync_processes(f"gemb converted_model done {out}")
    if rename_error is not None:
        raise rename_error
    if not _is_model_folder(out):
        raise FileNotFoundError(
            f"{out}: process 0 converted {name} there, but this process does not see the "
            f"finished folder. The processes of a job must share the folder: set GEMB_CACHE (or "
            f"converted_model.folder) to a gs:// path or a mount every host sees.")


def _rename_into_place(staging, out) -> None:
    if out.exists() and not _is_model_folder(out):  # a crash of an older gemb: not in use
        log.warning("%s is incomplete; replacing it", out)
        paths.rmtree(out)
    try:
        os.rename(staging, out)
    except OSError:
        if not _is_model_folder(out):
            raise
        log.info("%s was converted by another job meanwhile; using it", out)
        paths.rmtree(staging)


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
