"""The train and eval steps, and the `Trainer` that compiles them for a mesh (t5x's Trainer).

train_step(state, batch) -> (state, metrics) is pure: it asks the model (gemb.train.model.
EmbeddingModel) for embeddings and the loss, and never looks inside the batch.
How the gradient is computed is the `StepConfig`'s choice: the whole batch at once, gradient
caching (the memory of one chunk plus the B x B logits), or accumulation over microbatches, in
either layout of gemb.data.feature_converter. Gradient-cache chunks are strided chunks of each
role's ENCODER ROWS (a padded row is one example, a packed row several): rows are encoded
independently, so caching the gradient of the row outputs is exact. Microbatches are the
strided groups of examples (m, m + n, ...), each its own contrastive problem; a packed batch
has each group in rows of its own (FeatureConverter pack_groups), so the same strided split
cuts its rows (EmbeddingModel.split_microbatches).

The `Trainer` jits the steps with explicit in/out shardings and the state donated (argument 0):
the state lives on the mesh as given by gemb.train.state.StateLayout, the batch is placed by
the Partitioner over the data axes, and the metrics come back replicated. Under jit the batch is
ONE global array, so the loss sees every positive of the global batch as a negative without
hand-written collectives.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gemb.losses import full_batch_value_and_grad, gradient_cached_rows_value_and_grad
from gemb.partitioning.partitioner import Partitioner
from gemb.train import optimizers
from gemb.train.model import EmbeddingModel
from gemb.train.state import StateLayout, TrainState

PyTree = Any


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """How one step computes its gradient.

    Attributes:
      gradient_cache_chunk: examples per gradient-cache chunk (None: embed the batch at
        once): a microbatch of b examples is cut into b // gradient_cache_chunk chunks of each
        role's encoder rows (padded: the rows of gradient_cache_chunk examples; packed: the
        role's rows / chunks). Memory then holds one chunk's activations plus the B x B logits.
      microbatches: accumulate the gradient over this many microbatches. Each microbatch is its
        own contrastive problem (its in-batch negatives are its own examples), so this is NOT
        equivalent to a bigger batch; gradient caching is (use that to grow the batch).
      nan_policy: what to do when a step is not finite (its loss, gradient, update or new
        params hold a NaN or an infinity): 'skip' the update (the step counter and the data
        still advance), 'stop' training with an error naming the step, or 'ignore' (apply it).
      max_consecutive_nonfinite: with 'skip' (or 'ignore'), stop training with an error after
        this many non-finite steps in a row: a run that keeps producing NaN has diverged, and
        skipping on would only burn accelerator time and write nothing useful.
    """

    gradient_cache_chunk: int | None = None
    microbatches: int = 1
    nan_policy: str = "skip"
    max_consecutive_nonfinite: int = 5

    def __post_init__(self):
        if self.nan_policy not in ("skip", "stop", "ignore"):
            raise ValueError(f"StepConfig.nan_policy={self.nan_policy!r}; use 'skip', 'stop' or "
                             "'ignore'.")
        if self.microbatches < 1:
            raise ValueError(f"StepConfig.microbatches must be >= 1, got {self.microbatches}.")
        if self.max_consecutive_nonfinite < 1:
            raise ValueError("StepConfig.max_consecutive_nonfinite must be >= 1, got "
                             f"{self.max_consecutive_nonfinite}.")
        if self.gradient_cache_chunk is not None and self.gradient_cache_chunk < 1:
            raise ValueError("StepConfig.gradient_cache_chunk must be a positive number of "
                             f"examples or None, got {self.gradient_cache_chunk}.")

    def chunks_per_microbatch(self, batch_size: int) -> int:
        """Gradient-cache chunks of each microbatch of a global batch of batch_size (1: none)."""
        if not self.gradient_cache_chunk:
            return 1
        return max(1, batch_size // self.microbatches // self.gradient_cache_chunk)


def check_batch_size(batch_size: int, step_config: StepConfig, partitioner: Partitioner,
                     what: str = "data.batch_size") -> None:
    """Everything the global batch size must divide, checked once before any compute (the
    data axes divide it, so every process's block is whole too). Both layouts have the same
    needs: a packed batch's row counts follow from `packed_row_multiple`."""
    if batch_size < 1:
        raise ValueError(f"{what}={batch_size} must be positive.")
    partitioner.check_batch_size(batch_size, f"{what} (the global batch)")
    n = step_config.microbatches
    if batch_size % n:
        raise ValueError(f"{what}={batch_size} is not a multiple of step.microbatches={n}.")
    per_micro = batch_size // n
    chunk = step_config.gradient_cache_chunk
    if chunk and per_micro % chunk:
        of = f"{what}={batch_size}" if n == 1 else (
            f"a microbatch of {per_micro} examples ({what}={batch_size} / step.microbatches={n})")
        raise ValueError(f"{of} is not a multiple of step.gradient_cache_chunk={chunk}.")
    # Also makes every process's block a multiple of the microbatches (packed pack groups).
    if per_micro % partitioner.data_parallel_size:
        raise ValueError(f"a microbatch of {per_micro} examples ({what}={batch_size} / "
                         f"step.microbatches={n}) cannot be split over "
                         f"{partitioner.data_parallel_size} data shards; use a batch size that "
                         f"is a multiple of {n * partitioner.data_parallel_size}.")


def packed_row_multiple(step_config: StepConfig, batch_size: int,
                        local_data_parallel_size: int) -> int:
    """What each pack group's row count on one process is a multiple of (the FeatureConverter's
    row_multiple, DataShard.row_multiple): its data-parallel devices x the gradient-cache chunks
    of a microbatch. Every role's rows then split into the chunks (exactness needs the global
    rows of a microbatch to), and every chunk of every microbatch has whole rows on every
    device."""
    return local_data_parallel_size * step_config.chunks_per_microbatch(batch_size)


# --------------------------------------------------------------------------------- the steps


def make_value_and_grad(model: EmbeddingModel, step_config: StepConfig,
                        full_params: Callable[[PyTree], PyTree] | None = None) -> Callable:
    """f(params, batch, rng) -> ((loss, metrics), grads) as the step config asks.

    full_params(params) -> the model's whole parameter tree (default: params itself); the train
    step passes one that merges the frozen params back in, so only the trainable ones are
    differentiated.
    """
    full = full_params or (lambda params: params)

    def embed_fn(params, batch, rng):
        return model.embed_fn(full(params), batch, rng)

    def loss_fn(params, embeddings, batch):
        return model.loss_from_embeddings(full(params), embeddings, batch)

    chunk = step_config.gradient_cache_chunk
    if chunk:
        def encode_rows(params, rows, rng):
            return model.encode_rows(full(params), rows, rng)

        def loss_from_rows(params, row_outputs, batch):
            return loss_fn(params, model.embeddings_from_rows(row_outputs, batch), batch)

        def inner(params, batch, rng):
            examples = model.num_examples(batch)
            if examples % chunk:
                raise ValueError(f"a batch of {examples} examples is not a multiple of "
                                 f"StepConfig.gradient_cache_chunk={chunk}; see "
                                 "trainer.check_batch_size.")
            cached = gradient_cached_rows_value_and_grad(encode_rows, loss_from_rows,
                                                         examples // chunk)
            return cached(params, model.encoder_rows(batch), batch, rng)
    else:
        inner = full_batch_value_and_grad(embed_fn, loss_fn)
    n = step_config.microbatches
    if n == 1:
        return inner

    def accumulated(params, batch, rng):
        micro = model.split_microbatches(batch, n)

        def body(carry, args):
            index, mb = args
            (loss, metrics), grads = inner(params, mb, jax.random.fold_in(rng, index))
            loss_sum, metric_sum, grad_sum = carry
            grad_sum = jax.tree.map(lambda s, g: s + g.astype(s.dtype), grad_sum, grads)
            metric_sum = jax.tree.map(jnp.add, metric_sum, metrics)
            return (loss_sum + loss, metric_sum, grad_sum), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
                             params)
        metric_shapes = jax.eval_shape(lambda: inner(params, jax.tree.map(lambda x: x[0], micro),
                                                     rng)[0][1])
        metric_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
        (loss, metrics, grads), _ = jax.lax.scan(
            body, (jnp.zeros((), jnp.float32), metric_zeros, zeros), (jnp.arange(n), micro))
        grads = jax.tree.map(lambda p, g: (g / n).astype(p.dtype), params, grads)
        return (loss / n, jax.tree.map(lambda m: m / n, metrics)), grads

    return accumulated


def all_finite(tree) -> jax.Array:
    """One bool: every element of every floating-point leaf is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_train_step(model: EmbeddingModel, optimizer: optimizers.Optimizer,
                    step_config: StepConfig = StepConfig()) -> Callable:
    """The pure train step train_step(state, batch) -> (state, metrics); `Trainer` jits it."""
    freeze_patterns = tuple(optimizer.freeze_patterns)

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
        trainable, frozen = optimizers.split_trainable(state.params, freeze_patterns)
        merge = functools.partial(optimizers.merge_params, frozen=frozen)
        value_and_grad = make_value_and_grad(model, step_config, full_params=merge)
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, metrics), grads = value_and_grad(trainable, batch, rng)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.tx.update(grads, state.opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        update_norm = optax.global_norm(updates)
        # A finite loss and gradient can still give an infinite update (Adam's moments) or
        # overflow a parameter; any of them poisons every later step.
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
                  & all_finite(new_trainable))
        if step_config.nan_policy != "ignore":
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa
            new_trainable = keep(new_trainable, trainable)
            opt_state = keep(opt_state, state.opt_state)
        new_state = state.replace(step=state.step + 1, params=merge(new_trainable),
                                  opt_state=opt_state)
        metrics = dict(metrics, loss=loss.astype(jnp.float32), grad_norm=grad_norm,
                       update_norm=update_norm,
                       learning_rate=jnp.asarray(optimizer.schedule(state.step), jnp.float32),
                       finite=finite)
        return new_state, metrics

    return train_step


def make_eval_step(model: EmbeddingModel) -> Callable:
    """eval_step(params, batch) -> metrics (the training loss on a held-out batch)."""

    def eval_step(params, batch):
        _, metrics = model.loss_fn(params, batch)
        return metrics

    return eval_step


class Trainer:
    """The model's steps compiled for one optimiser and mesh; one program per batch structure.

    train_step / eval_step take host batches (this process's rows, numpy, as a `TrainingData`
    iterator yields them) and place them on the mesh themselves.
    """

    def __init__(self, model: EmbeddingModel, optimizer: optimizers.Optimizer,
                 partitioner: Partitioner, step_config: StepConfig = StepConfig()):
        self.model = model
        self.partitioner = partitioner
        self.step_config = step_config
        self.layout = StateLayout(model, optimizer, partitioner)
        self._train_step = make_train_step(model, optimizer, step_config)
        self._eval_step = make_eval_step(model)
        self._train_jits: dict = {}
        self._eval_jits: dict = {}
        self._replicated = jax.sharding.NamedSharding(partitioner.mesh,
                                                      jax.sharding.PartitionSpec())

    def _batch_shardings(self, batch) -> Any:
        return jax.tree.map(lambda x: self.partitioner.batch_sharding(np.ndim(x)), batch)

    @staticmethod
    def _key(batch) -> tuple:
        return tuple(sorted((k, np.ndim(v)) for k, v in batch.items()))

    def train_jit(self, batch) -> Callable:
        """The jitted train step for batches shaped like `batch` (arrays or ShapeDtypeStructs)."""
        key = self._key(batch)
        if key not in self._train_jits:
            self._train_jits[key] = jax.jit(
                self._train_step,
                in_shardings=(self.layout.shardings, self._batch_shardings(batch)),
                out_shardings=(self.layout.shardings, self._replicated), donate_argnums=(0,))
        return self._train_jits[key]

    def eval_jit(self, batch) -> Callable:
        key = self._key(batch)
        if key not in self._eval_jits:
            self._eval_jits[key] = jax.jit(
                self._eval_step,
                in_shardings=(self.layout.param_shardings, self._batch_shardings(batch)),
                out_shardings=self._replicated)
        return self._eval_jits[key]

    def place(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """A host batch on the mesh (done apart from the step, so the next batch can be placed
        while the current step runs)."""
        if self.step_config.microbatches > 1:
            self.model.check_microbatches(host_batch, self.step_config.microbatches)
        return self.partitioner.place_batch(host_batch)

    def train_step(self, state: TrainState, batch: Mapping[str, Any]
                   ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimiser step on a host batch, or on one `place` already put on the mesh."""
        if not all(isinstance(v, jax.Array) for v in batch.values()):
            batch = self.place(batch)
        with self.partitioner.activation_context():
            return self.train_jit(batch)(state, batch)

    def eval_step(self, params, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        batch = self.partitioner.place_batch(host_batch)
        with self.partitioner.activation_context():
            return self.eval_jit(batch)(params, batch)

    def lower_train_step(self, batch_spec: Mapping[str, jax.ShapeDtypeStruct]):
        """The train step lowered for abstract state and batch (gemb precompile)."""
        with self.partitioner.activation_context():
            return self.train_jit(batch_spec).lower(self.layout.abstract, batch_spec)
