"""Gradient caching: a contrastive step whose memory does not grow with the global batch.

An in-batch-negative loss couples every example with every other, so the naive step keeps the
encoder activations of the whole global batch alive until the backward pass. Gradient caching
(Gao et al., 2021) splits the step in three, all inside one traced function:

  1. embed the batch chunk by chunk (lax.map), keeping only the embeddings, not activations;
  2. compute the loss on the full embeddings and its gradient w.r.t. those embeddings
     (and w.r.t. any parameters the loss owns, e.g. a learnt temperature);
  3. re-run each chunk under jax.vjp and pull that chunk's embedding gradient back to the
     parameters, summing over chunks (lax.scan).

The result equals the full-batch gradient exactly (up to float summation order) at the cost of
one extra encoder forward pass; peak memory holds one chunk's activations plus the embeddings
and the logits of the global batch.

Chunk c takes the rows c, c + n, c + 2n, ... (n = number of chunks), not a contiguous block.
When the batch axis is sharded over devices in contiguous blocks (as jit does with a
NamedSharding on the batch), this keeps every chunk spread over all devices, so each device
works on every chunk instead of one device holding a whole chunk.

What is chunked are ENCODER ROWS, not examples (`gradient_cached_rows_value_and_grad`): the
encoder treats its rows independently, so caching dL/d(row outputs) is exact whatever the rows
hold. A packed batch (several examples per row, read back by slot) is then cached like a padded
one: each role's block of rows is split into chunks, the loss reads the examples from the
merged row outputs (a gather, whose gradient scatters back onto the rows), and each chunk of
rows pulls its slice of that gradient back. `gradient_cached_value_and_grad` is the special
case in which every row is one example.

With dropout or other randomness, chunk c is embedded with jax.random.fold_in(rng, c) in both
passes so the re-run reproduces the first pass; a full-batch step with the same rng draws
different masks, so the two agree in distribution, not bit for bit.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any
# embed_fn(params, batch, rng) -> embeddings pytree whose leaves have the batch as leading axis.
EmbedFn = Callable[[PyTree, PyTree, jax.Array | None], PyTree]
# encode_fn(params, rows, rng) -> outputs pytree; each output's leading axis is the rows of the
# input it came from, row i computed from input row i alone.
EncodeFn = Callable[[PyTree, PyTree, jax.Array | None], PyTree]
# loss_fn(params, embeddings, batch) -> (scalar loss, metrics dict).
LossFn = Callable[[PyTree, PyTree, PyTree], tuple[jax.Array, dict[str, jax.Array]]]
ValueAndGradFn = Callable[..., tuple[tuple[jax.Array, dict[str, jax.Array]], PyTree]]


def global_batch_size(batch: PyTree) -> int:
    """The leading-axis size shared by every leaf of the batch; errors when they disagree."""
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        shapes = jax.tree.map(lambda leaf: leaf.shape, batch)
        raise ValueError(
            "every batch feature must have the global batch as its leading axis, got shapes "
            f"{shapes}; reshape per-batch scalars to [batch] or pass them outside the batch."
        )
    return sizes.pop()


def split_rows(tree: PyTree, parts: int, what: str = "chunks") -> PyTree:
    """[B, ...] -> [parts, B // parts, ...], part c holding rows c, c + parts, c + 2 * parts ...

    The one splitter of a global batch into gradient-cache chunks or accumulation
    microbatches. Strided rather than contiguous parts: with the batch axis sharded over devices
    in contiguous blocks, every part then stays spread over all devices.
    """

    def split(x):
        if x.shape[0] % parts:
            raise ValueError(f"the global batch of {x.shape[0]} cannot be split into {parts} "
                             f"{what}; use a batch size that is a multiple of {parts}.")
        x = x.reshape((x.shape[0] // parts, parts) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, tree)


def _merge_chunks(tree: PyTree) -> PyTree:
    """Inverse of `split_rows`."""

    def merge(x):
        x = jnp.swapaxes(x, 0, 1)
        return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])

    return jax.tree.map(merge, tree)


def _chunk_rng(rng: jax.Array | None, chunk_index: jax.Array) -> jax.Array | None:
    return None if rng is None else jax.random.fold_in(rng, chunk_index)


def _accumulation_dtype(dtype) -> jnp.dtype:
    # bf16 parameter gradients summed over many chunks would drop low-order bits each time.
    return jnp.promote_types(dtype, jnp.float32)


def _check_rows_split(rows: PyTree, num_chunks: int) -> None:
    """Every row block divides into the chunks; the error names the block and the fix."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(rows):
        if not leaf.ndim or leaf.shape[0] % num_chunks:
            count = leaf.shape[0] if leaf.ndim else "no"
            raise ValueError(
                f"the rows of {jax.tree_util.keystr(path)} ({count} rows, shape {leaf.shape}) "
                f"cannot be split into {num_chunks} gradient-cache chunks; every row block must "
                f"be a multiple of {num_chunks}. A packed batch rounds its row counts to the "
                "FeatureConverter's row_multiple: make it a multiple of the chunks (gemb.train."
                "run does, through DataShard.row_multiple = trainer.packed_row_multiple(...)), "
                "or change StepConfig.gradient_cache_chunk.")


def gradient_cached_rows_value_and_grad(
    encode_fn: EncodeFn, loss_fn: LossFn, num_chunks: int
) -> Callable[..., tuple[tuple[jax.Array, dict[str, jax.Array]], PyTree]]:
    """Returns f(params, rows, batch, rng=None) -> ((loss, metrics), grads), rows in chunks.

    Args:
      encode_fn: encode_fn(params, row_chunk, rng) -> outputs pytree (e.g. {role: [r, S, E]})
        for a chunk of the rows. It must treat rows independently (no batch statistics), as
        an encoder does, and give each output the leading axis of the rows it came from.
      loss_fn: loss_fn(params, outputs, batch) -> (loss, metrics) on the outputs of ALL rows
        (merged back in their original order) and the whole batch, e.g. reading each example's
        embedding from its (row, segment). `params` lets the loss own parameters (a learnt
        temperature); ignore it otherwise.
      num_chunks: how many chunks the rows are cut into (strided, as `split_rows`); every leaf
        of `rows` must have a multiple of it as its leading axis (leaves may differ in rows:
        one block per role).

    The returned function is pure and meant to be traced inside one jit together with the
    optimizer update. Its gradients equal those of differentiating
    loss_fn(params, encode_fn(params, rows, rng), batch) end to end.
    """
    if not isinstance(num_chunks, int) or num_chunks <= 0:
        raise ValueError(f"num_chunks must be a positive int, got {num_chunks!r}.")

    def value_and_grad(params, rows, batch, rng=None):
        _check_rows_split(rows, num_chunks)
        chunks = split_rows(rows, num_chunks)
        chunk_indices = jnp.arange(num_chunks)

        # Pass 1: row outputs only. Nothing here is differentiated, so no activation outlives
        # its chunk's iteration.
        def encode_chunk(args):
            index, chunk = args
            return encode_fn(params, chunk, _chunk_rng(rng, index))

        outputs = _merge_chunks(jax.lax.map(encode_chunk, (chunk_indices, chunks)))
        outputs = jax.lax.stop_gradient(outputs)
        not_float = {
            jax.tree_util.keystr(path): leaf.dtype
            for path, leaf in jax.tree_util.tree_leaves_with_path(outputs)
            if not jnp.issubdtype(leaf.dtype, jnp.floating)
        }
        if not_float:
            raise ValueError(
                f"the embedding function returned non-float outputs {not_float}; the gradient "
                "cache differentiates every output, so return only the embedding arrays and "
                "read masks and other features from the batch in loss_fn."
            )

        # The loss on the whole global batch, and the gradient cache: dL/d(row outputs).
        (loss, metrics), (loss_param_grads, output_grads) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True
        )(params, outputs, batch)

        # Pass 2: re-encode each chunk and back-propagate its slice of the cache.
        def accumulate(grad_sum, args):
            index, chunk, output_cotangent = args
            _, pull_back = jax.vjp(
                lambda p: encode_fn(p, chunk, _chunk_rng(rng, index)), params
            )
            (chunk_grads,) = pull_back(output_cotangent)
            grad_sum = jax.tree.map(lambda s, g: s + g.astype(s.dtype), grad_sum, chunk_grads)
            return grad_sum, None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, _accumulation_dtype(p.dtype)), params)
        encoder_grads, _ = jax.lax.scan(
            accumulate,
            zeros,
            (chunk_indices, chunks, split_rows(output_grads, num_chunks)),
        )
        grads = jax.tree.map(
            lambda p, encoder_grad, loss_grad: (encoder_grad + loss_grad).astype(p.dtype),
            params,
            encoder_grads,
            loss_param_grads,
        )
        return (loss, metrics), grads

    return value_and_grad


def gradient_cached_value_and_grad(
    embed_fn: EmbedFn, loss_fn: LossFn, chunk_size: int
) -> ValueAndGradFn:
    """Returns f(params, batch, rng=None) -> ((loss, metrics), grads), computed in chunks.

    The case of `gradient_cached_rows_value_and_grad` in which every row is one example: the
    whole batch (every leaf led by the batch) is split into chunks of examples.

    Args:
      embed_fn: embed_fn(params, chunk_batch, rng) -> embeddings pytree (e.g. a dict with
        'query' [b, E], 'positive' [b, E], 'negatives' [b, K, E]) for a chunk of b rows.
        It must treat rows independently (no batch statistics), as an encoder does.
      loss_fn: loss_fn(params, embeddings, batch) -> (loss, metrics) on the global batch.
        `params` lets the loss own parameters (a learnt temperature); ignore it otherwise.
      chunk_size: rows embedded at once; must divide the global batch.

    The returned function is pure and meant to be traced inside one jit together with the
    optimizer update. Its gradients equal those of `full_batch_value_and_grad`.
    """
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")

    def value_and_grad(params, batch, rng=None):
        batch_size = global_batch_size(batch)
        if batch_size % chunk_size:
            raise ValueError(
                f"the global batch of {batch_size} is not divisible by the gradient-cache "
                f"chunk_size={chunk_size}; pick a chunk_size that divides the batch size "
                "(or a batch size that is a multiple of it)."
            )
        cached = gradient_cached_rows_value_and_grad(embed_fn, loss_fn, batch_size // chunk_size)
        return cached(params, batch, batch, rng)

    return value_and_grad


def full_batch_value_and_grad(embed_fn: EmbedFn, loss_fn: LossFn) -> ValueAndGradFn:
    """The plain step: embed the whole batch at once and differentiate end to end.

    Same interface as `gradient_cached_value_and_grad`; fine for small batches, and the
    reference the cached gradients are tested against.
    """

    def value_and_grad(params, batch, rng=None):
        def total_loss(params):
            return loss_fn(params, embed_fn(params, batch, rng), batch)

        return jax.value_and_grad(total_loss, has_aux=True)(params)

    return value_and_grad
