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
from typing import Optional, Sequence


def _set_device_count(num_devices: int) -> None:
    flag = f"--xla_force_host_platform_device_count={num_devices}"
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + flag).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _gib(n: float) -> str:
    return f"{n / 2**30:9.3f} GiB ({n / 2**20:,.1f} MiB)"


def precompile(num_devices: int, batch_size: Optional[int] = None,
               query_length: Optional[int] = None, document_length: Optional[int] = None,
               num_negatives: Optional[int] = None, print_fn=print) -> dict[str, float]:
    """Compiles the gin-configured train step; returns the per-device memory in bytes.

    The model, optimiser, step and mesh are what `gemb train` would build from the same gin
    files (train(dry_run=True), on the first num_devices devices). The batch is the run's own
    data config (train.data) at its longest rows, with the given sizes replacing its own; a
    run file without train.data gets synthetic data of the given sizes.
    """
    import dataclasses
    import tempfile

    import gin
    import jax
    import numpy as np

    from gemb.data.feature_converter import FeatureConverterConfig, full_length_features
    from gemb.train import data as data_lib
    from gemb.train import trainer as trainer_lib

    if jax.device_count() != num_devices:
        raise ValueError(f"precompile needs {num_devices} devices but jax sees "
                         f"{jax.device_count()}; jax was started before XLA_FLAGS could be set. "
                         "Run `gemb precompile` in a fresh process.")
    train = gin.get_configurable("train")
    overrides: dict = {"dry_run": True}
    if not _is_bound("train.model_dir"):
        overrides["model_dir"] = tempfile.gettempdir()  # a dry run writes nothing
    if not _is_bound("train.num_steps"):
        overrides["num_steps"] = 1000  # only the schedule's shape depends on it
    if not _is_bound("train.data"):
        overrides["data"] = data_lib.SyntheticData(
            batch_size=batch_size or 64, num_negatives=num_negatives or 0,
            features=FeatureConverterConfig(query_length=query_length or 128,
                                            document_length=document_length or 256,
                                            length_buckets=()))
    built = train(**overrides)
    data = built["data"]
    features = dataclasses.replace(
        data.features, **{k: v for k, v in (("query_length", query_length),
                                            ("document_length", document_length),
                                            ("num_negatives", num_negatives)) if v is not None})
    batch_size = batch_size or data.batch_size
    k = features.num_negatives if features.num_negatives is not None else getattr(
        data, "num_negatives", 0)
    run_trainer = built["trainer"]
    partitioner = run_trainer.partitioner
    step_config = run_trainer.step_config
    trainer_lib.check_batch_size(batch_size, step_config, partitioner, what="--batch_size")
    # The rows `gemb train` would pack on one process of this mesh (pack groups, row multiple).
    row_multiple = trainer_lib.packed_row_multiple(
        step_config, batch_size, partitioner.data_layout().local_data_parallel_size)
    host_batch = full_length_features(features, batch_size, k, row_multiple=row_multiple,
                                      pack_groups=step_config.microbatches)
    batch_spec = {name: jax.ShapeDtypeStruct(value.shape, value.dtype,
                                             sharding=partitioner.batch_sharding(value.ndim))
                  for name, value in host_batch.items()}
    compiled = run_trainer.lower_train_step(batch_spec).compile()
    analysis = compiled.memory_analysis()
    layout = run_trainer.layout
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
    encoder = run_trainer.model.encoder_config
    tokens = sum(int(np.prod(v.shape)) for name, v in host_batch.items() if name.endswith("_tokens"))
    print_fn(f"{encoder.transformer.name}: {layout.num_params:,} params "
             f"({layout.num_trainable:,} trainable), mesh {dict(partitioner.mesh.shape)} on "
             f"{num_devices} fake CPU devices, global batch {batch_size} ({tokens:,} tokens), "
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


def _is_bound(parameter: str) -> bool:
    import gin

    try:
        gin.query_parameter(parameter)
    except ValueError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gemb precompile", description=__doc__.splitlines()[0])
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--gin_search_path", action="append", default=[])
    parser.add_argument("--num_devices", type=int, default=8)
    # Each defaults to the run's data config (train.data), else 64 / 128 / 256 / 0.
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--query_length", type=int, default=None)
    parser.add_argument("--document_length", type=int, default=None)
    parser.add_argument("--num_negatives", type=int, default=None)
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
