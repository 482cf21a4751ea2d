"""Peak host memory of checkpoint checksums over fsdp-sharded arrays (8 fake CPU devices).

  python bench/checksum_memory.py [--rows 262144] [--cols 640]

Two float32 [rows, cols] arrays (Gemma 3 270M's embedding table by default), one sharded over
its rows, one (transposed) over its columns, on an 8-device fsdp mesh; prints the process's
peak RSS (VmHWM) before and after gemb.train.checksums.tree_checksums. A checksum that gathered
the arrays would add about devices x array size.
"""

import argparse
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def peak_gib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=262144)
    parser.add_argument("--cols", type=int, default=640)
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from gemb.train import checksums

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))
    rows = jax.device_put(jnp.ones((args.rows, args.cols), jnp.float32),
                          NamedSharding(mesh, PartitionSpec("fsdp", None)))
    cols = jax.device_put(jnp.ones((args.cols, args.rows), jnp.float32),
                          NamedSharding(mesh, PartitionSpec(None, "fsdp")))
    jax.block_until_ready((rows, cols))
    size = rows.nbytes / 2**30
    before = peak_gib()
    checksums.tree_checksums({"rows": rows, "cols": cols})
    print(f"2 arrays of {size:.2f} GiB on 8 devices: peak RSS {before:.2f} GiB before the "
          f"checksums, {peak_gib():.2f} GiB after")


if __name__ == "__main__":
    main()
