"""Run by test_packing.py as one of several JAX processes: each process packs its OWN examples
(token ids from a range no other process uses), the batch is placed and embedded across all
processes, and each process checks that the rows of its block are the embeddings of its own
texts (computed alone, padded, on this process). Prints one JSON line of measurements."""

import json

import jax

from gemb import distributed

distributed.initialize()

import numpy as np  # noqa: E402  (after the distributed start, as every gemb entry point)
from jax.experimental import multihost_utils  # noqa: E402

from gemb.data.feature_converter import (FeatureConverter, FeatureConverterConfig,  # noqa: E402
                                         RoleTokens, TokenBatch, agree_across_processes)
from gemb.models.config import TINY_ENCODER  # noqa: E402
from gemb.partitioning import mesh as mesh_lib  # noqa: E402
from gemb.partitioning.partitioner import Partitioner  # noqa: E402
from gemb.train.model import EmbeddingModel  # noqa: E402

LOCAL_EXAMPLES = 8
encoder = TINY_ENCODER.replace(transformer=TINY_ENCODER.transformer.replace(num_layers=2))
model = EmbeddingModel(encoder)
partitioner = Partitioner(mesh_lib.create_mesh())
layout = partitioner.data_layout()
process = jax.process_index()

# Texts of different lengths so that rows pack several examples; ids disjoint per process.
rng = np.random.default_rng(process)
low = 10 + 100 * process


def texts(count, longest):
    return [rng.integers(low, low + 90, size=int(rng.integers(2, longest))).tolist()
            for _ in range(count)]


batch = TokenBatch(RoleTokens.from_lists(texts(LOCAL_EXAMPLES, 10)),
                   RoleTokens.from_lists(texts(LOCAL_EXAMPLES, 14)),
                   RoleTokens.from_lists([]), np.zeros(LOCAL_EXAMPLES, np.int32))
config = FeatureConverterConfig(query_length=32, document_length=32, pack=True,
                                segments_per_row=4, length_buckets=())
converter = FeatureConverter(config, row_multiple=layout.local_data_parallel_size,
                             shard_index=layout.shard_index)
plan = converter.plan(batch)
packed = converter.convert(plan, agree_across_processes(plan.layout))

params_host = jax.jit(model.init_params, static_argnums=0)(0)  # same seed: same params
replicated = jax.sharding.NamedSharding(partitioner.mesh, jax.sharding.PartitionSpec())
params = jax.tree.map(lambda x: jax.make_array_from_process_local_data(
    replicated, np.asarray(x), x.shape), params_host)
with partitioner.activation_context():
    embedded = jax.jit(model.embed_fn)(params, partitioner.place_batch(packed))

# This process's rows of the global [B, E] results.
first = layout.shard_index * LOCAL_EXAMPLES
mine = {}
for role in ("query", "positive"):
    rows = np.zeros((LOCAL_EXAMPLES, embedded[role].shape[-1]), np.float32)
    for shard in embedded[role].addressable_shards:
        start = shard.index[0].start or 0
        for offset, row in enumerate(np.asarray(shard.data)):
            if first <= start + offset < first + LOCAL_EXAMPLES:
                rows[start + offset - first] = row
    mine[role] = rows

# The reference: the same texts alone on this process, padded (no slots at all).
padded = FeatureConverter(FeatureConverterConfig(query_length=32, document_length=32,
                                                 length_buckets=())).convert(batch)
alone = jax.jit(model.embed_fn)(params_host, padded)
diff = max(float(np.abs(mine[r] - np.asarray(alone[r])).max()) for r in mine)
# The other processes' blocks hold other texts: their rows must differ from ours.
everything = multihost_utils.process_allgather(mine["query"])
others = [float(np.abs(everything[p] - mine["query"]).max())
          for p in range(jax.process_count()) if p != process]
print("RESULT " + json.dumps({"process": process, "block": layout.shard_index,
                              "rows_per_role": {r: int(packed[f"{r}_tokens"].shape[0])
                                                for r in ("query", "positive")},
                              "max_slot": int(packed["query_slot"].max()),
                              "max_abs_diff": diff, "min_diff_to_other_blocks": min(others)}),
      flush=True)
