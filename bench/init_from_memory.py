"""Peak host memory per process of init_from on a multi-process fsdp mesh.

    python bench/init_from_memory.py                      # 4 processes x 2 CPU devices
    python bench/init_from_memory.py --model_dir DIR --num_processes 4

Starts N JAX processes (gemb.local_processes) that each build the model's abstract params
sharded over an fsdp mesh of every device, then load the model folder's params into them, and
prints each process's peak resident memory (ru_maxrss) before and after the load, for:
  sharded:    gemb's init_from (checkpointing.load_init_params): each process reads only the
              shards its devices hold, straight into their shardings;
  whole_tree: the earlier path (read the whole tree into host memory, then place), which
              init_from still takes when the layer stacking must change.
Default model: the 270M folder the quickstart converts (~/.cache/gemb/models/gemma3-270m).
"""

import argparse
import json
import resource
import sys
from pathlib import Path


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def worker(model_dir: str, mode: str) -> None:
    from gemb import distributed

    distributed.initialize()
    import jax

    from gemb.checkpoints import model_dir as model_dir_lib
    from gemb.partitioning import mesh as mesh_lib
    from gemb.partitioning.partitioner import Partitioner
    from gemb.train import checkpointing
    from gemb.train.model import EmbeddingModel

    config, _ = model_dir_lib.read_model_config(model_dir)
    mesh = mesh_lib.create_mesh({"data": 1, "fsdp": -1, "tensor": 1},
                                {"data": -1, "fsdp": 1, "tensor": 1})
    partitioner = Partitioner(mesh)
    abstract = partitioner.abstract_params(EmbeddingModel(config).boxed_params())["encoder"]
    before = peak_gib()
    if mode == "sharded":
        params = checkpointing.load_init_params(model_dir, abstract, target_config=config)
    else:
        params_dir = (Path(model_dir) / model_dir_lib.PARAMS_DIRNAME).absolute()
        params = checkpointing._load_relayout(  # pylint: disable=protected-access
            Path(model_dir), params_dir, config, config,
            {"/".join(k): v for k, v in
             __import__("flax").traverse_util.flatten_dict(abstract).items()}, ())
    jax.block_until_ready(params)
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("loaded")  # process 0 (the coordinator) exits last
    print("RESULT " + json.dumps({
        "process": jax.process_index(), "mode": mode, "mesh": dict(mesh.shape),
        "peak_rss_before_load_gib": round(before, 3), "peak_rss_gib": round(peak_gib(), 3),
        "local_param_bytes_gib": round(sum(
            s.data.nbytes for leaf in jax.tree.leaves(params) for s in leaf.addressable_shards)
            / 2**30, 3)}), flush=True)
    multihost_utils.sync_global_devices("reported")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default=str(Path.home() / ".cache/gemb/models/gemma3-270m"))
    parser.add_argument("--num_processes", type=int, default=4)
    parser.add_argument("--devices_per_process", type=int, default=2)
    parser.add_argument("--worker", choices=("sharded", "whole_tree"))
    args = parser.parse_args()
    if args.worker:
        worker(args.model_dir, args.worker)
        return 0
    from gemb import local_processes

    if not Path(args.model_dir, "gemb_model.json").is_file():
        print(f"{args.model_dir} is not a gemb model folder; run the quickstart (or gemb "
              "convert --from gemma3-270m --out DIR) first.", file=sys.stderr)
        return 2
    for mode in ("whole_tree", "sharded"):
        results = local_processes.run(
            [__file__, "--model_dir", args.model_dir, "--worker", mode], args.num_processes,
            args.devices_per_process, python_args=())
        for result in results:
            lines = [l for l in result.output.splitlines() if l.startswith("RESULT ")]
            if result.returncode or not lines:
                print(result.output[-3000:], file=sys.stderr)
                return 1
            print(lines[0][len("RESULT "):], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
