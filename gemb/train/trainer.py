"""Pure train and eval steps: train_step(state, batch) -> (state, metrics).

The batch is the feature dict of gemb.data.feature_converter, in one of two layouts:

* example-major (padded batches, see `example_major`): query / positive tokens [B, L] and
  negatives [B, K, L], one row per example. Every leaf has the global batch B as its leading
  axis, so the batch can be cut into gradient-cache chunks or accumulation microbatches.
* packed: role blocks of R rows holding several examples each, with *_slot indices. The whole
  batch goes through the encoder at once (no gradient caching, no microbatches).

Steps are jitted with explicit in/out shardings and the state donated (argument 0): the state
lives on the mesh as given by gemb.train.state.StateLayout, the batch is split over the data
axes, and the metrics come back replicated. Under jit the batch is ONE global array, so the loss
sees every positive of the global batch as a negative without hand-written collectives.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gemb.losses import (
    ContrastiveLossConfig,
    full_batch_value_and_grad,
    gradient_cached_value_and_grad,
    matryoshka_contrastive_loss,
)
from gemb.models import encoder as encoder_lib
from gemb.models.config import EncoderConfig
from gemb.partitioning.partitioner import Partitioner
from gemb.train import optimizers
from gemb.train.state import StateLayout, TrainState

PyTree = Any
ROLES = ("query", "positive", "negatives")
_TOKEN_FEATURES = ("tokens", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """How one step computes its gradient.

    Attributes:
      gradient_cache_chunk: rows per gradient-cache chunk (None: embed the batch at once).
        Memory then holds one chunk's activations plus the B x B logits.
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
            raise ValueError("StepConfig.gradient_cache_chunk must be a positive number of rows "
                             f"or None, got {self.gradient_cache_chunk}.")


# ------------------------------------------------------------------------------ batch layouts


def is_padded(features: Mapping[str, np.ndarray]) -> bool:
    """True when every role holds one example per row (S = 1, R = B or B * K)."""
    batch = features["query_slot"].shape[0]
    k = features["negative_slot"].shape[1] if "negative_slot" in features else 0
    return (features["query_segment_mask"].shape == (batch, 1)
            and features["positive_segment_mask"].shape == (batch, 1)
            and features.get("negatives_segment_mask", np.zeros((batch * k, 1))).shape[0] == batch * k
            and np.array_equal(features["query_slot"], np.arange(batch))
            and np.array_equal(features["positive_slot"], np.arange(batch)))


def example_major(features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Padded converter features -> one row per example, negatives [B, K, L] (host numpy).

    Slots and segment masks are dropped (they are implied); with K = 0 every negatives feature
    is dropped, so pair and triplet tasks compile to different programs only through K.
    """
    if not is_padded(features):
        raise ValueError(
            "example_major needs padded features (FeatureConverterConfig.pack=False); packed "
            "batches hold several examples per row. Turn packing off, or train without gradient "
            "caching and microbatches.")
    batch = features["query_slot"].shape[0]
    k = features["negative_slot"].shape[1] if "negative_slot" in features else 0
    out = {}
    for role in ("query", "positive"):
        for name in _TOKEN_FEATURES:
            out[f"{role}_{name}"] = features[f"{role}_{name}"]
    for key in ("query_hash", "positive_hash"):
        if key in features:
            out[key] = features[key]
    if k:
        for name in _TOKEN_FEATURES:
            value = features[f"negatives_{name}"]
            out[f"negatives_{name}"] = value.reshape(batch, k, value.shape[-1])
        out["negative_mask"] = features["negative_mask"]
        if "negative_hash" in features:
            out["negative_hash"] = features["negative_hash"]
    return out


def packed_batch(features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed converter features as the step takes them (K = 0 negatives dropped)."""
    k = features["negative_slot"].shape[1] if "negative_slot" in features else 0
    out = dict(features)
    if not k or features["negatives_tokens"].shape[0] == 0:
        for key in list(out):
            if key.startswith("negative"):
                del out[key]
    return out


def prepare_batch(features: Mapping[str, np.ndarray], pack: bool | None = None) -> dict[str, np.ndarray]:
    """The step's batch from converter features: example-major when padded, else packed."""
    if pack is None:
        pack = not is_padded(features)
    return packed_batch(features) if pack else example_major(features)


def batch_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Non-padding tokens of a batch (for tokens/s)."""
    return int(sum(np.count_nonzero(batch[f"{role}_segment_ids"]) for role in ROLES
                   if f"{role}_segment_ids" in batch))


# --------------------------------------------------------------------------- embed and loss


def make_embed_fn(encoder_config: EncoderConfig) -> Callable:
    """embed_fn(params, batch, rng) -> {'query' [B, E], 'positive' [B, E], 'negatives' [B, K, E]}.

    Works on example-major and packed batches (see the module docstring).
    """
    model = encoder_lib.Encoder(encoder_config)

    def encode(params, batch, role, num_segments):
        tokens = batch[f"{role}_tokens"]
        length = tokens.shape[-1]
        output = model.apply(
            {"params": params["encoder"]}, tokens.reshape(-1, length),
            batch[f"{role}_segment_ids"].reshape(-1, length),
            batch[f"{role}_positions"].reshape(-1, length), num_segments=num_segments)
        return output["projected"]  # [R, S, E] float32

    def embed(params, batch, rng):
        del rng  # the encoder has no dropout
        if "query_slot" in batch:  # packed
            out = {}
            for role, slot in (("query", "query_slot"), ("positive", "positive_slot"),
                               ("negatives", "negative_slot")):
                if f"{role}_tokens" not in batch:
                    continue
                num_segments = batch[f"{role}_segment_mask"].shape[1]
                projected = encode(params, batch, role, num_segments)
                flat = projected.reshape(-1, projected.shape[-1])
                out["negatives" if role == "negatives" else role] = flat[batch[slot]]
            return out
        out = {"query": encode(params, batch, "query", 1)[:, 0],
               "positive": encode(params, batch, "positive", 1)[:, 0]}
        if "negatives_tokens" in batch:
            rows, k = batch["negatives_tokens"].shape[:2]
            out["negatives"] = encode(params, batch, "negatives", 1)[:, 0].reshape(rows, k, -1)
        return out

    return embed


def loss_config_for(encoder_config: EncoderConfig, loss_config: ContrastiveLossConfig
                    ) -> ContrastiveLossConfig:
    """The loss runs on the model's Matryoshka prefixes unless the loss config names its own."""
    if loss_config.matryoshka_dims:
        return loss_config
    return dataclasses.replace(loss_config,
                               matryoshka_dims=tuple(sorted(encoder_config.matryoshka_dims)))


def make_loss_fn(loss_config: ContrastiveLossConfig) -> Callable:
    def loss_fn(params, embeddings, batch):
        return matryoshka_contrastive_loss(embeddings, batch, config=loss_config,
                                           log_temperature=params.get("log_temperature"))

    return loss_fn


# --------------------------------------------------------------------------------- the steps


def _split_microbatches(batch, n):
    """[B, ...] -> [n, B / n, ...], microbatch m holding rows m, m + n, ... (spread over devices)."""
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"the global batch of {x.shape[0]} cannot be split into "
                             f"{n} microbatches; use a batch size that is a multiple of {n}.")
        return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def make_value_and_grad(embed_fn, loss_fn, step_config: StepConfig):
    if step_config.gradient_cache_chunk:
        inner = gradient_cached_value_and_grad(embed_fn, loss_fn, step_config.gradient_cache_chunk)
    else:
        inner = full_batch_value_and_grad(embed_fn, loss_fn)
    n = step_config.microbatches
    if n == 1:
        return inner

    def accumulated(params, batch, rng):
        micro = _split_microbatches(batch, n)

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


def make_train_step(encoder_config: EncoderConfig, loss_config: ContrastiveLossConfig,
                    tx: optax.GradientTransformation, schedule: optax.Schedule,
                    freeze_patterns, step_config: StepConfig = StepConfig()) -> Callable:
    """The pure train step train_step(state, batch) -> (state, metrics); jit it yourself or
    with `jit_train_step`."""
    embed_fn = make_embed_fn(encoder_config)
    loss_fn = make_loss_fn(loss_config_for(encoder_config, loss_config))
    freeze_patterns = tuple(freeze_patterns)

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
        trainable, frozen = optimizers.split_trainable(state.params, freeze_patterns)
        merge = functools.partial(optimizers.merge_params, frozen=frozen)
        value_and_grad = make_value_and_grad(
            lambda p, b, r: embed_fn(merge(p), b, r),
            lambda p, e, b: loss_fn(merge(p), e, b), step_config)
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, metrics), grads = value_and_grad(trainable, batch, rng)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
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
                       learning_rate=jnp.asarray(schedule(state.step), jnp.float32),
                       finite=finite)
        return new_state, metrics

    return train_step


def make_eval_step(encoder_config: EncoderConfig, loss_config: ContrastiveLossConfig) -> Callable:
    """eval_step(params, batch) -> metrics (the training loss on a held-out batch)."""
    embed_fn = make_embed_fn(encoder_config)
    loss_fn = make_loss_fn(loss_config_for(encoder_config, loss_config))

    def eval_step(params, batch):
        _, metrics = loss_fn(params, embed_fn(params, batch, None), batch)
        return metrics

    return eval_step


class CompiledSteps:
    """The jitted steps for one state layout; one compiled program per batch structure/shape."""

    def __init__(self, layout: StateLayout, train_step: Callable, eval_step: Callable | None = None):
        self.layout = layout
        self.partitioner: Partitioner = layout.partitioner
        self._train_step = train_step
        self._eval_step = eval_step
        self._train_jits: dict = {}
        self._eval_jits: dict = {}
        self._replicated = jax.sharding.NamedSharding(self.partitioner.mesh,
                                                      jax.sharding.PartitionSpec())

    def batch_shardings(self, batch) -> Any:
        return jax.tree.map(lambda x: self.partitioner.batch_sharding(x.ndim), batch)

    def _key(self, batch):
        return tuple(sorted((k, np.ndim(v)) for k, v in batch.items()))

    def train_jit(self, batch):
        key = self._key(batch)
        if key not in self._train_jits:
            self._train_jits[key] = jax.jit(
                self._train_step, in_shardings=(self.layout.shardings, self.batch_shardings(batch)),
                out_shardings=(self.layout.shardings, self._replicated), donate_argnums=(0,))
        return self._train_jits[key]

    def eval_jit(self, batch):
        key = self._key(batch)
        if key not in self._eval_jits:
            self._eval_jits[key] = jax.jit(
                self._eval_step, in_shardings=(self.layout.param_shardings,
                                               self.batch_shardings(batch)),
                out_shardings=self._replicated)
        return self._eval_jits[key]

    def check_batch(self, batch) -> None:
        for name, value in batch.items():
            self.partitioner.check_batch_size(np.shape(value)[0], f"batch feature {name!r}")

    def train(self, state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
        self.check_batch(batch)
        with self.partitioner.activation_context():
            return self.train_jit(batch)(state, batch)

    def evaluate(self, params, batch) -> dict[str, jax.Array]:
        self.check_batch(batch)
        with self.partitioner.activation_context():
            return self.eval_jit(batch)(params, batch)
