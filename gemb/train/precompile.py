"""`gemb precompile`: compile the train step ahead of time for a mesh, print per-device memory.

    gemb precompile --gin_file=gin/models/gemma3_4b.gin --gin_file=gin/partitioning/fsdp.gin \\
        --num_devices=8 --batch_size=64 --query_length=128 --document_length=256

Runs on fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, set here before
jax starts) with abstract params from jax.eval_shape: no weights are read or allocated. A bad
sharding (a dimension the mesh does not divide) or a step that does not fit shows here, before
anyone books accelerators. Memory comes from the compiled executable's memory_analysis(): the
arguments (params, optimiser state, batch), outputs, and temporaries of one device. The numbers
are XLA:CPU's; a TPU/GPU compile differs in fusion and layout, so treat them as an estimate
(the parameter and optimiser bytes are exact).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def _set_device_count(num_devices: int) -> None:
    flag = f"--xla_force_host_platform_device_count={num_devices}"
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + flag).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _gib(n: float) -> str:
    return f"{n / 2**30:9.3f} GiB ({n / 2**20:,.1f} MiB)"


def precompile(num_devices: int, batch_size: int, query_length: int, document_length: int,
               num_negatives: int = 0, print_fn=print) -> dict[str, float]:
    """Compiles the gin-configured train step; returns the per-device memory in bytes."""
    import gin
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gemb.losses import ContrastiveLossConfig
    from gemb.partitioning import mesh as mesh_lib
    from gemb.partitioning.partitioner import Partitioner
    from gemb.train import main as main_lib
    from gemb.train import optimizers, trainer
    from gemb.train.state import StateLayout

    devices = jax.devices()
    if len(devices) < num_devices:
        raise ValueError(f"precompile needs {num_devices} devices but jax sees {len(devices)}; "
                         "jax was started before XLA_FLAGS could be set. Run `gemb precompile` "
                         "in a fresh process.")
    devices = devices[:num_devices]
    bound = _train_bindings()
    encoder = bound["encoder"]
    loss = bound.get("loss", ContrastiveLossConfig())
    optimizer = bound.get("optimizer", optimizers.OptimizerConfig())
    step_config = bound.get("step", trainer.StepConfig())
    parallelism = _partitioner_bindings()
    mesh = mesh_lib.create_mesh(parallelism.get("ici_parallelism", (-1, 1, 1)),
                                parallelism.get("dcn_parallelism", (1, 1, 1)), devices=devices)
    partitioner = Partitioner(mesh)
    partitioner.check_batch_size(batch_size, "--batch_size (the global batch)")
    tx, schedule = optimizers.make_optimizer(optimizer, 1000)
    layout = StateLayout(encoder, loss, tx, optimizer.freeze_patterns, partitioner)
    train_step = trainer.make_train_step(encoder, loss, tx, schedule, optimizer.freeze_patterns,
                                         step_config)

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=partitioner.batch_sharding(len(shape)))

    batch = {}
    for role, length in (("query", query_length), ("positive", document_length)):
        for name in ("tokens", "segment_ids", "positions"):
            batch[f"{role}_{name}"] = spec((batch_size, length), jnp.int32)
    if num_negatives:
        for name in ("tokens", "segment_ids", "positions"):
            batch[f"negatives_{name}"] = spec((batch_size, num_negatives, document_length), jnp.int32)
        batch["negative_mask"] = spec((batch_size, num_negatives), jnp.bool_)
        batch["negative_hash"] = spec((batch_size, num_negatives), jnp.int32)
    batch["query_hash"] = spec((batch_size,), jnp.int32)
    batch["positive_hash"] = spec((batch_size,), jnp.int32)

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    jitted = jax.jit(train_step, in_shardings=(layout.shardings,
                                               jax.tree.map(lambda s: s.sharding, batch)),
                     out_shardings=(layout.shardings, replicated), donate_argnums=(0,))
    with partitioner.activation_context():
        compiled = jitted.lower(layout.abstract, batch).compile()
    analysis = compiled.memory_analysis()
    state_bytes = sum(
        int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        // _shards(leaf.sharding, leaf.shape)
        for leaf in jax.tree.leaves(layout.abstract))
    result = {
        "arguments": float(analysis.argument_size_in_bytes),
        "outputs": float(analysis.output_size_in_bytes),
        "temporaries": float(analysis.temp_size_in_bytes),
        "aliased": float(analysis.alias_size_in_bytes),
        "generated_code": float(analysis.generated_code_size_in_bytes),
        "train_state": float(state_bytes),
    }
    result["peak_estimate"] = (result["arguments"] + result["outputs"] + result["temporaries"]
                               - result["aliased"])
    tokens = batch_size * (query_length + document_length * (1 + num_negatives))
    print_fn(f"{encoder.transformer.name}: {layout.num_params:,} params "
             f"({layout.num_trainable:,} trainable), mesh {dict(mesh.shape)} on {num_devices} "
             f"fake CPU devices, global batch {batch_size} ({tokens:,} tokens), "
             f"compute {encoder.transformer.dtype}, remat {encoder.transformer.remat_policy}, "
             f"gradient cache chunk {step_config.gradient_cache_chunk}")
    print_fn("per-device memory (compiled.memory_analysis()):")
    for key in ("train_state", "arguments", "outputs", "aliased", "temporaries", "peak_estimate"):
        print_fn(f"  {key:<14} {_gib(result[key])}")
    return result


def _shards(sharding, shape) -> int:
    shard_shape = sharding.shard_shape(shape)
    import math

    return max(1, math.prod(shape) // max(1, math.prod(shard_shape))) if shape else 1


def _train_bindings() -> dict:
    """The objects gin binds to train(...) (model, loss, optimiser, step)."""
    import gin

    out = {}
    for name in ("encoder", "loss", "optimizer", "step"):
        try:
            value = gin.query_parameter(f"train.{name}")
        except ValueError:
            continue
        out[name] = _resolve(value)
    if "encoder" not in out:
        raise ValueError("no model: pass a model gin file (e.g. --gin_file=gin/models/gemma3_1b.gin)"
                         " that binds train.encoder.")
    return out


def _partitioner_bindings() -> dict:
    import gin

    out = {}
    for name in ("ici_parallelism", "dcn_parallelism"):
        try:
            out[name] = _resolve(gin.query_parameter(f"partitioner.{name}"))
        except ValueError:
            pass
    return out


def _resolve(value):
    """Evaluates gin macros and configurable references (@name()) to Python objects."""
    import gin

    if isinstance(value, gin.config.ConfigurableReference):
        return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
    if isinstance(value, gin.config.MacroReference if hasattr(gin.config, "MacroReference")
                  else ()):
        return _resolve(gin.query_parameter(f"{value.name}/macro.value"))
    if isinstance(value, dict):
        return {k: _resolve(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(v) for v in value)
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gemb precompile", description=__doc__.splitlines()[0])
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--gin_search_path", action="append", default=[])
    parser.add_argument("--num_devices", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--query_length", type=int, default=128)
    parser.add_argument("--document_length", type=int, default=256)
    parser.add_argument("--num_negatives", type=int, default=0)
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    bindings = []
    for item in rest:
        if not item.startswith("--gin.") or "=" not in item:
            parser.error(f"unrecognised argument {item}; bindings are --gin.NAME=VALUE")
        bindings.append(item[len("--gin."):])
    if not args.gin_file:
        parser.error("give a model gin file, e.g. --gin_file=gin/models/gemma3_1b.gin")
    _set_device_count(args.num_devices)
    from gemb.train import main as main_lib

    main_lib.parse_gin(args.gin_file, bindings, args.gin_search_path)
    precompile(args.num_devices, args.batch_size, args.query_length, args.document_length,
               args.num_negatives)
    return 0


if __name__ == "__main__":
    sys.exit(main())
