"""Optimiser and learning-rate schedules (optax), and the trainable / frozen split of params.

AdamW with a weight-decay mask: matrices decay, norm scales, biases and scalars do not (the
usual rule: decaying a norm scale towards 0 shrinks a layer's output, which is not what weight
decay is for). Global-norm clipping runs before Adam. Frozen parameters are taken out of the
optimiser altogether (`split_trainable`): they get no gradient, no Adam moments and no update,
which for Gemma 3 270M's embedding table (168M of 268M parameters) saves most of the optimiser
memory and the backward scatter into the table.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax.numpy as jnp
import optax
from flax import traverse_util

PyTree = Any

# Path patterns (regexes on "a/b/c" parameter paths) that never get weight decay.
DEFAULT_NO_DECAY = (r"(^|/)scale$", r"(^|/)bias$", r"(^|/)b$", r"norm", r"log_temperature")


def path_string(path: tuple) -> str:
    return "/".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Everything about the update rule (gin: `OptimizerConfig.learning_rate = 1e-4`, ...).

    Attributes:
      learning_rate: peak learning rate.
      schedule: 'cosine', 'linear' (decay to end_fraction) or 'constant' after warmup.
      warmup_steps: linear warmup from 0 to the peak.
      end_fraction: the learning rate at the last step as a fraction of the peak.
      weight_decay: AdamW's decoupled weight decay (on matrices only, see no_decay_patterns).
      b1, b2, eps: Adam's moments.
      clip_norm: global gradient-norm clipping; None or 0 switches it off.
      freeze_patterns: regexes; a parameter whose path matches one is frozen (re.search).
      no_decay_patterns: regexes of parameters without weight decay (plus every < 2-D array).
    """

    learning_rate: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    end_fraction: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    freeze_patterns: tuple[str, ...] = ()
    no_decay_patterns: tuple[str, ...] = DEFAULT_NO_DECAY

    def __post_init__(self):
        object.__setattr__(self, "freeze_patterns", tuple(self.freeze_patterns))
        object.__setattr__(self, "no_decay_patterns", tuple(self.no_decay_patterns))
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"OptimizerConfig.schedule={self.schedule!r}; use 'cosine', 'linear' "
                             "or 'constant'.")
        if self.learning_rate < 0 or self.warmup_steps < 0:
            raise ValueError("OptimizerConfig.learning_rate and warmup_steps must be >= 0, got "
                             f"{self.learning_rate} and {self.warmup_steps}.")
        for pattern in self.freeze_patterns + self.no_decay_patterns:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"OptimizerConfig: bad regex {pattern!r} ({error}).") from None


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    peak, warmup = config.learning_rate, config.warmup_steps
    decay_steps = max(total_steps - warmup, 1)
    end = peak * config.end_fraction
    if config.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif config.schedule == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.end_fraction)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(params: PyTree, no_decay_patterns: Sequence[str]) -> PyTree:
    """True where a parameter gets weight decay: arrays of >= 2 dims not matching a pattern."""
    compiled = [re.compile(p) for p in no_decay_patterns]
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({
        path: getattr(value, "ndim", 0) >= 2 and not any(c.search(path_string(path)) for c in compiled)
        for path, value in flat.items()
    })


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """What a train step needs of the update rule.

    Attributes:
      tx: the optax transformation of the TRAINABLE params (frozen ones are split off first).
      schedule: the learning rate by step (logged).
      freeze_patterns: the regexes of the frozen params (OptimizerConfig.freeze_patterns).
    """

    tx: optax.GradientTransformation
    schedule: optax.Schedule
    freeze_patterns: tuple[str, ...] = ()


def make_optimizer(config: OptimizerConfig, total_steps: int) -> Optimizer:
    """AdamW with the config's schedule, decay mask and clipping, for a run of total_steps."""
    schedule = learning_rate_schedule(config, total_steps)
    parts = []
    if config.clip_norm:
        parts.append(optax.clip_by_global_norm(config.clip_norm))
    # The first moment is kept in float32 even for bf16 parameters: the running mean of small
    # gradients is where bf16's 8-bit mantissa would lose the update.
    parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                             weight_decay=config.weight_decay, mu_dtype=jnp.float32,
                             mask=lambda p: decay_mask(p, config.no_decay_patterns)))
    return Optimizer(optax.chain(*parts), schedule, config.freeze_patterns)


# ---------------------------------------------------------------------- trainable / frozen split


def frozen_paths(params: PyTree, patterns: Sequence[str]) -> set[tuple]:
    compiled = [re.compile(p) for p in patterns]
    return {path for path in traverse_util.flatten_dict(params)
            if any(c.search(path_string(path)) for c in compiled)}


def check_freeze_patterns(params: PyTree, patterns: Sequence[str]) -> None:
    """Every pattern must match something and something must stay trainable."""
    flat = traverse_util.flatten_dict(params)
    for pattern in patterns:
        if not any(re.search(pattern, path_string(p)) for p in flat):
            examples = [path_string(p) for p in list(flat)[:6]]
            raise ValueError(f"freeze pattern {pattern!r} matches no parameter; paths look like "
                             f"{examples}.")
    if len(frozen_paths(params, patterns)) == len(flat):
        raise ValueError(f"freeze patterns {list(patterns)} freeze every parameter; nothing would "
                         "train.")


def split_trainable(params: PyTree, patterns: Sequence[str]) -> tuple[PyTree, PyTree]:
    """(trainable, frozen): two nested dicts that `merge_params` puts back together."""
    flat = traverse_util.flatten_dict(params)
    frozen = frozen_paths(params, patterns)
    trainable = {p: v for p, v in flat.items() if p not in frozen}
    fixed = {p: v for p, v in flat.items() if p in frozen}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(fixed)


def merge_params(trainable: PyTree, frozen: PyTree) -> PyTree:
    flat = dict(traverse_util.flatten_dict(frozen))
    flat.update(traverse_util.flatten_dict(trainable))
    return traverse_util.unflatten_dict(flat)


def count_params(tree: PyTree) -> int:
    import math

    return sum(math.prod(getattr(v, "shape", ())) for v in traverse_util.flatten_dict(tree).values())

