"""The train state: everything a step reads and writes, and what a checkpoint holds.

params = {"encoder": {"transformer": ..., "head": ...}} plus "log_temperature" when the loss
learns its temperature. The optimiser state covers only the trainable params (frozen ones are
left out, see gemb.train.optimizers.split_trainable). rng is a raw uint32[2] key: the step's key
is fold_in(rng, step), so it never has to be advanced and a resumed run draws the same keys.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import linen as nn

from gemb.partitioning.partitioner import Partitioner
from gemb.train import optimizers
from gemb.train.model import EmbeddingModel

PyTree = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: PyTree
    opt_state: PyTree
    rng: jax.Array  # uint32 [2]

    def to_tree(self) -> dict[str, Any]:
        """A plain dict (what orbax saves)."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state,
                "rng": self.rng}

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> "TrainState":
        return cls(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"],
                   rng=tree["rng"])


class StateLayout:
    """Shapes and shardings of the train state for one model, optimiser and mesh."""

    def __init__(self, model: EmbeddingModel, optimizer: optimizers.Optimizer,
                 partitioner: Partitioner):
        self.model = model
        self.tx = optimizer.tx
        self.freeze_patterns = tuple(optimizer.freeze_patterns)
        self.partitioner = partitioner
        boxed = model.boxed_params()
        self.param_shardings = nn.unbox(partitioner.param_shardings(boxed))
        self.abstract_params = partitioner.abstract_params(boxed)
        optimizers.check_freeze_patterns(self.abstract_params, self.freeze_patterns)
        trainable, _ = optimizers.split_trainable(self.abstract_params, self.freeze_patterns)
        trainable_shardings, _ = optimizers.split_trainable(self.param_shardings,
                                                             self.freeze_patterns)
        self.num_params = optimizers.count_params(self.abstract_params)
        self.num_trainable = optimizers.count_params(trainable)
        # Optimiser leaves follow the shape of the params they belong to; scalars replicate.
        abstract_opt = jax.eval_shape(self.tx.init, trainable)
        self.opt_shardings = _match_param_shardings(abstract_opt, trainable, trainable_shardings,
                                                    partitioner)
        replicated = jax.sharding.NamedSharding(partitioner.mesh, jax.sharding.PartitionSpec())
        self.shardings = TrainState(step=replicated, params=self.param_shardings,
                                    opt_state=self.opt_shardings, rng=replicated)
        self.abstract = jax.tree.map(
            lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
            TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=self.abstract_params,
                       opt_state=abstract_opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32)),
            self.shardings)

    def create(self, params: PyTree, seed: int) -> TrainState:
        """A fresh state around `params` (placed on the mesh by the jit's out_shardings)."""
        def build(params):
            trainable, _ = optimizers.split_trainable(params, self.freeze_patterns)
            return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=self.tx.init(trainable),
                              rng=jax.random.PRNGKey(seed).astype(jnp.uint32))

        return jax.jit(build, in_shardings=(self.param_shardings,),
                       out_shardings=self.shardings)(params)

    def random_params(self, seed: int) -> PyTree:
        """Random params created directly in their sharded placement."""
        return jax.jit(lambda: self.model.init_params(seed), out_shardings=self.param_shardings)()


def _match_param_shardings(abstract_opt, trainable, trainable_shardings, partitioner):
    """Each optimiser leaf shaped like a trainable param gets that param's sharding.

    optax states (Adam's mu / nu) hold trees with the params' structure; matching by tree path
    suffix is exact for them and leaves counters replicated.
    """
    from flax import traverse_util

    by_path = {path: sharding for path, sharding in
               traverse_util.flatten_dict(trainable_shardings).items()}
    shapes = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(trainable).items()}
    replicated = jax.sharding.NamedSharding(partitioner.mesh, jax.sharding.PartitionSpec())

    def one(path, leaf):
        keys = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)
        for start in range(len(keys)):
            suffix = keys[start:]
            if suffix in by_path and shapes[suffix] == leaf.shape:
                return by_path[suffix]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_opt)

