"""Small builders shared by the trainer tests (TINY model, synthetic data)."""

import os
import re

import jax
import numpy as np

from gemb.data.feature_converter import FeatureConverterConfig
from gemb.losses import ContrastiveLossConfig
from gemb.models.config import TINY_ENCODER
from gemb.partitioning import mesh as mesh_lib
from gemb.partitioning.partitioner import Partitioner
from gemb.train import data, optimizers, trainer
from gemb.train.model import EmbeddingModel

# TINY cut to 2 layers: the same structure (GQA, local + global attention) at a fraction of
# TINY's compile time, for tests that are not about the model.
SMALL = TINY_ENCODER.replace(transformer=TINY_ENCODER.transformer.replace(num_layers=2))
LOSS = ContrastiveLossConfig(temperature=0.05)
OPTIMIZER = optimizers.OptimizerConfig(learning_rate=3e-3, warmup_steps=1, weight_decay=0.01)


def one_device_env(**overrides) -> dict[str, str]:
    """This test session's environment for a `gemb train` subprocess on one CPU device (the
    session's other XLA flags kept)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    return {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=1".strip(),
            **overrides}


def partitioner_for(ici, num_devices):
    return Partitioner(mesh_lib.create_mesh(ici, devices=jax.devices()[:num_devices]))


def build(partitioner, step_config=trainer.StepConfig(), encoder=SMALL, loss=LOSS,
          optimizer=OPTIMIZER, num_steps=10, seed=0):
    """(state layout, a fresh state, the Trainer) for SMALL (or `encoder`) on `partitioner`."""
    model = EmbeddingModel(encoder, loss)
    steps = trainer.Trainer(model, optimizers.make_optimizer(optimizer, num_steps), partitioner,
                            step_config)
    layout = steps.layout
    state = layout.create(layout.random_params(seed), seed)
    return layout, state, steps


def synthetic(batch_size=16, num_negatives=1, seed=0, pack=False, **kwargs):
    """SyntheticData with 12-token queries and 16-token documents, every row at full length."""
    features = FeatureConverterConfig(query_length=12, document_length=16, length_buckets=(),
                                      pack=pack)
    return data.SyntheticData(batch_size=batch_size, num_negatives=num_negatives, seed=seed,
                              features=features, **kwargs)


def synthetic_batches(n, batch_size=16, num_negatives=1, seed=0, pack=False):
    iterator = synthetic(batch_size, num_negatives, seed, pack).make()
    return [next(iterator) for _ in range(n)]


def run_losses(partitioner, batches, step_config=trainer.StepConfig(), **kwargs):
    _, state, steps = build(partitioner, step_config, **kwargs)
    losses = []
    for batch in batches:
        state, metrics = steps.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


def save_checkpoints(directory, steps_to_save, async_save=True):
    """Trains SMALL on synthetic batches and checkpoints the given steps into a run directory.
    Returns (state layout, meta record, {step: the saved state tree as numpy})."""
    from gemb.train import checkpointing, run

    layout, state, steps = build(partitioner_for((1, 1, 1), 1))
    config = checkpointing.CheckpointConfig(keep=5, async_save=async_save)
    ckpt = checkpointing.RunCheckpointer(directory, config)
    meta = run._model_meta(SMALL, LOSS, OPTIMIZER)
    saved = {}
    for i, batch in enumerate(synthetic_batches(max(steps_to_save))):
        state, _ = steps.train_step(state, batch)
        if i + 1 in steps_to_save:
            ckpt.save(i + 1, state, {"batch_index": i + 1}, meta)
            saved[i + 1] = jax.tree.map(np.asarray, state.to_tree())
    ckpt.close()
    return layout, meta, saved
