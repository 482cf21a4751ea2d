"""Compiled memory of the 270M train-step gradient per attention backend and row length.

    python bench/attention_memory.py                      # 270M, batch 32, T = 512 1024 2048
    python bench/attention_memory.py --lengths 512 --backends xla blockwise --batch 8

Nothing is allocated or run: parameters and the batch are abstract (jax.ShapeDtypeStruct) and
each gradient (value_and_grad of the contrastive loss over every parameter: query and positive
rows of T tokens, bf16 compute, fp32 params, scanned layers, no remat unless --remat) is only lowered and
compiled for the first CPU device; XLA's memory_analysis() gives the buffers it planned. The
Pallas kernels (splash, pallas_gpu) do not compile for XLA:CPU outside interpret mode, so on CPU
this compares 'xla' (dense scores) with 'blockwise' (query blocks, the window's band on local
layers, scores re-computed in the backward pass). XLA:CPU's plan is an estimate of a TPU/GPU
compile's; the difference between backends is what the table is for.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from gemb.data.feature_converter import FeatureConverterConfig, full_length_features
from gemb.models.config import EncoderConfig, transformer_preset
from gemb.train.model import EmbeddingModel

GIB = 2**30


def compiled_memory(preset: str, backend: str, length: int, batch: int, block: int,
                    dtype: str, remat: str = "none") -> dict[str, float]:
    transformer = transformer_preset(preset).replace(attention_backend=backend,
                                                     attention_block_size=block, dtype=dtype,
                                                     remat_policy=remat)
    model = EmbeddingModel(EncoderConfig(transformer=transformer))
    features = full_length_features(
        FeatureConverterConfig(query_length=length, document_length=length, length_buckets=()),
        batch)
    batch_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in features.items()}
    params = jax.eval_shape(lambda: model.init_params(0))
    grad = jax.jit(jax.value_and_grad(lambda p, b: model.loss_fn(p, b)[0]))
    start = time.time()
    analysis = grad.lower(params, batch_spec).compile().memory_analysis()
    return {"temp_gib": analysis.temp_size_in_bytes / GIB,
            "arguments_gib": analysis.argument_size_in_bytes / GIB,
            "compile_s": time.time() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gemma3_270m")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--backends", nargs="+", default=["xla", "blockwise"])
    parser.add_argument("--block", type=int, default=512, help="attention_block_size")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--remat", default="none", help="TransformerConfig.remat_policy")
    args = parser.parse_args()
    print(f"{args.preset}, batch {args.batch} (query + positive rows of T tokens), compute "
          f"{args.dtype}, block {args.block}, remat {args.remat}; temporaries of value_and_grad, XLA:CPU plan")
    print(f"{'T':>6} " + " ".join(f"{b + ' GiB':>16}" for b in args.backends) + "   ratio")
    for length in args.lengths:
        temps = []
        for backend in args.backends:
            result = compiled_memory(args.preset, backend, length, args.batch, args.block,
                                     args.dtype, args.remat)
            temps.append(result["temp_gib"])
        ratio = temps[0] / temps[-1] if temps[-1] else float("nan")
        print(f"{length:>6} " + " ".join(f"{t:>16.2f}" for t in temps) + f"   {ratio:5.2f}x",
              flush=True)
    print(f"(arguments: {result['arguments_gib']:.2f} GiB: fp32 params + batch)")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
