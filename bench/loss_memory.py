"""Compiled peak memory of the contrastive train-step gradient, with and without gradient caching.

    python bench/loss_memory.py                       # Gemma 3 270M, batches 256 1024 4096
    python bench/loss_memory.py --preset tiny --batch-sizes 64 256 --chunk-size 32

Nothing is allocated: parameters and batches are ShapeDtypeStructs (jax.eval_shape), and each
step is only lowered and compiled; XLA's memory_analysis() reports the buffers it planned
(temp + arguments + outputs). The step is value_and_grad of the in-batch contrastive loss
(pre-finetuning: no hard negatives, Matryoshka prefixes of the preset) over all encoder
parameters.

With gradient caching, the step's memory should grow with the global batch only through the
embeddings and the B x B logits (docs/recipe.md, "Loss"); the table prints that expectation beside
the measured growth. Without caching, the activations of every layer for every row are kept
for the backward pass, so memory grows with B x layers x sequence length.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemb.losses import (
    ContrastiveLossConfig,
    full_batch_value_and_grad,
    gradient_cached_value_and_grad,
    matryoshka_contrastive_loss,
)

FLOAT32_BYTES = 4
GIB = 2**30


def encoder_embed_fn(encoder):
    """embed_fn over token features: query and positive rows go through one encoder call."""

    def embed(params, batch, rng):
        del rng
        rows = batch["query_tokens"].shape[0]
        tokens = jnp.concatenate([batch["query_tokens"], batch["positive_tokens"]], axis=0)
        segment_ids = (tokens != 0).astype(jnp.int32)
        projected = encoder.apply({"params": params}, tokens, segment_ids)["projected"][:, 0, :]
        return {"query": projected[:rows], "positive": projected[rows:]}

    return embed


def token_batch_spec(batch_size: int, sequence_length: int) -> dict[str, jax.ShapeDtypeStruct]:
    tokens = jax.ShapeDtypeStruct((batch_size, sequence_length), jnp.int32)
    hashes = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    return {
        "query_tokens": tokens,
        "positive_tokens": tokens,
        "query_hash": hashes,
        "positive_hash": hashes,
    }


def compiled_memory(step, params, batch) -> dict[str, int]:
    analysis = jax.jit(step).lower(params, batch).compile().memory_analysis()
    sizes = {
        "temp": analysis.temp_size_in_bytes,
        "argument": analysis.argument_size_in_bytes,
        "output": analysis.output_size_in_bytes,
    }
    sizes["total"] = sum(sizes.values())
    return sizes


def embeddings_and_logits_bytes(batch_size: int, embedding_dim: int, num_dims: int) -> int:
    """One float32 copy of the query and positive embeddings and of each prefix's B x B logits."""
    return FLOAT32_BYTES * (2 * batch_size * embedding_dim + num_dims * batch_size**2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset", default="gemma3_270m", help="transformer preset (gemb.models.config)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--sequence-length", type=int, default=32)
    parser.add_argument("--skip-full-batch", action="store_true", help="only the cached step")
    args = parser.parse_args(argv)

    from gemb.models import config as model_config
    from gemb.models.encoder import Encoder

    transformer = model_config.transformer_preset(args.preset)
    if args.preset == "tiny":
        encoder_config = model_config.TINY_ENCODER
    else:
        encoder_config = model_config.EncoderConfig(transformer=transformer)
    encoder = Encoder(encoder_config)
    dims = tuple(sorted(encoder_config.matryoshka_dims))
    loss_config = ContrastiveLossConfig(temperature=0.02, matryoshka_dims=dims)

    def loss_fn(params, embeddings, batch):
        del params
        return matryoshka_contrastive_loss(embeddings, batch, config=loss_config)

    embed_fn = encoder_embed_fn(encoder)
    sample = jax.ShapeDtypeStruct((1, args.sequence_length), jnp.int32)
    params = nn.unbox(jax.eval_shape(encoder.init, jax.random.key(0), sample)["params"])
    num_params = sum(leaf.size for leaf in jax.tree.leaves(params))

    steps = {"cached": gradient_cached_value_and_grad(embed_fn, loss_fn, args.chunk_size)}
    if not args.skip_full_batch:
        steps["full"] = full_batch_value_and_grad(embed_fn, loss_fn)

    print(f"# {args.preset}: {num_params / 1e6:.1f}M params, embedding {encoder_config.embedding_dim}, "
          f"Matryoshka dims {dims}, sequence length {args.sequence_length}, chunk {args.chunk_size}, "
          f"backend {jax.default_backend()}")
    results: dict[tuple[str, int], dict[str, int]] = {}
    for batch_size in args.batch_sizes:
        for name, step in steps.items():
            start = time.time()
            batch = token_batch_spec(batch_size, args.sequence_length)
            results[name, batch_size] = compiled_memory(step, params, batch)
            elapsed = time.time() - start
            print(f"#   compiled {name:6s} B={batch_size:5d} in {elapsed:5.1f} s", flush=True)

    header = (
        f"| {'step':6s} | {'batch':>5s} | {'temp GiB':>9s} | {'args GiB':>9s} "
        f"| {'out GiB':>8s} | {'peak GiB':>9s} |"
    )
    print()
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for (name, batch_size), sizes in sorted(results.items()):
        print(f"| {name:6s} | {batch_size:5d} | {sizes['temp'] / GIB:9.3f} | {sizes['argument'] / GIB:9.3f} "
              f"| {sizes['output'] / GIB:8.3f} | {sizes['total'] / GIB:9.3f} |")

    smallest = min(args.batch_sizes)
    print()
    print(f"Growth of the peak from B={smallest} (MiB); expected = one float32 copy of the embeddings "
          f"[2B, {encoder_config.embedding_dim}] and of {len(dims)} B x B logits, plus the token arguments.")
    print(f"| {'step':6s} | {'batch':>5s} | {'measured':>10s} | {'expected':>10s} | {'ratio':>6s} |")
    print("|--------|-------|------------|------------|--------|")
    for name in steps:
        for batch_size in args.batch_sizes:
            if batch_size == smallest:
                continue
            measured = results[name, batch_size]["total"] - results[name, smallest]["total"]
            expected = (
                embeddings_and_logits_bytes(batch_size, encoder_config.embedding_dim, len(dims))
                - embeddings_and_logits_bytes(smallest, encoder_config.embedding_dim, len(dims))
                + FLOAT32_BYTES * (2 * args.sequence_length + 2) * (batch_size - smallest)
            )
            print(f"| {name:6s} | {batch_size:5d} | {measured / 2**20:10.1f} | {expected / 2**20:10.1f} "
                  f"| {measured / expected:6.2f} |")


if __name__ == "__main__":
    main()
