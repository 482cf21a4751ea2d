"""Joining a multi-process JAX job: how many processes, which one this is, where the
coordinator is, and which local accelerators this process drives.

gemb runs multi-controller: every host (or GPU) runs the same `gemb ...` command, and each
process must call jax.distributed.initialize() with the same coordinator and its own id before
anything touches a device. Platforms start processes differently, so `detect()` reads the
environment each one sets:

- explicit (anything else, and the local multi-process harness): JAX_COORDINATOR_ADDRESS
  (host:port of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID, optionally
  JAX_LOCAL_DEVICE_IDS (comma-separated). All three or none: a half-set environment is an error.
- SLURM (`srun`): JAX's own SLURM detection for the coordinator, count and id. Local devices:
  one task per node drives every GPU of the node; k tasks per node split the node's GPUs evenly
  (one GPU each when there are k GPUs). JAX alone would show only GPU 0 to a one-task-per-node
  job.
- GKE with xpk, GPU node pools: JAX_COORDINATOR_IP, JAX_COORDINATOR_PORT, NNODES, NODE_RANK (one
  process per node, all its GPUs).
- Cloud TPU VMs, pods and multislice (gcloud ... --worker=all, GKE/xpk TPU): JAX's own TPU
  detection (metadata server, TPU_WORKER_HOSTNAMES, MEGASCALE_*).

Explicit JAX_* values override what a platform supplies (as in jax.distributed.initialize).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
from typing import Optional

log = logging.getLogger(__name__)

COORDINATOR = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES = "JAX_NUM_PROCESSES"
PROCESS_ID = "JAX_PROCESS_ID"
LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"
INIT_TIMEOUT = "GEMB_DISTRIBUTED_TIMEOUT"  # seconds to wait for every process to join

_SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                    "SLURM_LOCALID")
_XPK_GPU_VARS = ("JAX_COORDINATOR_IP", "JAX_COORDINATOR_PORT", "NNODES", "NODE_RANK")


class DistributedSetupError(ValueError):
    """The environment describes a multi-process job only in part, or inconsistently."""


@dataclasses.dataclass(frozen=True)
class ProcessSetup:
    """What this process passes to jax.distributed.initialize (platform: where it came from)."""

    platform: str = "single"  # single | explicit | slurm | xpk-gpu | tpu
    num_processes: int = 1
    process_id: int = 0
    coordinator_address: Optional[str] = None
    local_device_ids: Optional[tuple[int, ...]] = None  # None: every device this process sees

    @property
    def is_multi_process(self) -> bool:
        return self.num_processes > 1

    def describe(self) -> str:
        devices = ("all local devices" if self.local_device_ids is None
                   else f"local devices {list(self.local_device_ids)}")
        return (f"process {self.process_id} of {self.num_processes} ({self.platform}), "
                f"coordinator {self.coordinator_address}, {devices}")


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DistributedSetupError(f"{name}={value!r} is not a whole number.") from None


def _id_list(name: str, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise DistributedSetupError(f"{name}={value!r} must be comma-separated device ids, "
                                    "like 0,1,2,3.") from None


def _explicit() -> dict:
    """The JAX_* variables that are set, parsed."""
    env = os.environ
    values = {}
    if env.get(COORDINATOR):
        address = env[COORDINATOR]
        if not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", address):
            raise DistributedSetupError(
                f"{COORDINATOR}={address!r} must be host:port (process 0's address and a free "
                "port, the same on every process).")
        values["coordinator_address"] = address
    if env.get(NUM_PROCESSES):
        values["num_processes"] = _int(NUM_PROCESSES, env[NUM_PROCESSES])
    if env.get(PROCESS_ID):
        values["process_id"] = _int(PROCESS_ID, env[PROCESS_ID])
    if env.get(LOCAL_DEVICE_IDS):
        values["local_device_ids"] = _id_list(LOCAL_DEVICE_IDS, env[LOCAL_DEVICE_IDS])
    return values


def _tasks_on_this_node() -> int:
    """How many SLURM tasks of this step share this node (SLURM_STEP_TASKS_PER_NODE reads like
    '8(x2),4': eight tasks on each of the first two nodes, four on the third)."""
    env = os.environ
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        if env.get("SLURM_NTASKS_PER_NODE"):
            return _int("SLURM_NTASKS_PER_NODE", env["SLURM_NTASKS_PER_NODE"])
        nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        return max(1, int(env["SLURM_NTASKS"]) // nodes)
    per_node = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise DistributedSetupError(f"cannot read SLURM_STEP_TASKS_PER_NODE={spec!r}.")
        per_node += [int(match.group(1))] * int(match.group(2) or 1)
    node = int(env.get("SLURM_NODEID", "0"))
    return per_node[node] if node < len(per_node) else per_node[-1]


def _slurm_local_device_ids() -> Optional[tuple[int, ...]]:
    """The GPUs this task drives: all of the node's with one task per node, else its share."""
    env = os.environ
    tasks = _tasks_on_this_node()
    if tasks == 1:
        return None  # every visible GPU (JAX alone would pick GPU SLURM_LOCALID = 0 only)
    local_id = int(env["SLURM_LOCALID"])
    on_node = int(env["SLURM_GPUS_ON_NODE"]) if env.get("SLURM_GPUS_ON_NODE") else None
    visible = env.get("CUDA_VISIBLE_DEVICES")
    num_visible = len([d for d in visible.split(",") if d.strip()]) if visible else None
    if on_node is not None and num_visible is not None and num_visible < on_node:
        return None  # SLURM bound this task's own GPUs (--gpus-per-task / --gpu-bind)
    gpus = on_node if on_node is not None else num_visible
    if gpus is None:
        return (local_id,)  # unknown GPU count: one GPU per task, as JAX assumes
    if gpus % tasks:
        raise DistributedSetupError(
            f"{tasks} SLURM tasks on a node with {gpus} GPUs cannot split them evenly: use "
            f"--ntasks-per-node=1 (one process drives all {gpus}) or --ntasks-per-node={gpus} "
            "(one process per GPU).")
    share = gpus // tasks
    return tuple(range(local_id * share, (local_id + 1) * share))


def _jax_detect(explicit: dict, local_device_ids) -> tuple:
    """JAX's own cluster detection (SLURM, Cloud TPU) for what `explicit` leaves unset."""
    from jax._src import clusters  # the detection jax.distributed.initialize() itself runs

    timeout = int(os.environ.get(INIT_TIMEOUT, "300"))
    return clusters.ClusterEnv.auto_detect_unset_distributed_params(
        explicit.get("coordinator_address"), explicit.get("num_processes"),
        explicit.get("process_id"), local_device_ids, None, timeout)


def _on_cloud_tpu_vm() -> bool:
    try:
        from jax._src import cloud_tpu_init
    except ImportError:
        return False
    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)


def detect() -> ProcessSetup:
    """This process's place in the job, from the environment (see the module docstring)."""
    env = os.environ
    explicit = _explicit()

    if all(env.get(name) for name in _XPK_GPU_VARS) and not explicit:
        setup = ProcessSetup("xpk-gpu", _int("NNODES", env["NNODES"]),
                             _int("NODE_RANK", env["NODE_RANK"]),
                             f"{env['JAX_COORDINATOR_IP']}:{env['JAX_COORDINATOR_PORT']}")
    elif env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        missing = [name for name in _SLURM_STEP_VARS if not env.get(name)]
        if missing:
            raise DistributedSetupError(
                f"a SLURM job of {env['SLURM_NTASKS']} tasks, but {', '.join(missing)} "
                "unset: start gemb through srun (srun python -m gemb.train ...), which starts "
                "one process per task and tells each its rank.")
        local_ids = explicit.get("local_device_ids", _slurm_local_device_ids())
        coordinator, count, pid, _ = _jax_detect(explicit, local_ids or [0])
        setup = ProcessSetup("slurm", count, pid, coordinator, local_ids)
    elif _on_cloud_tpu_vm() and not {"num_processes", "process_id"} <= explicit.keys():
        coordinator, count, pid, _ = _jax_detect(explicit, [0])  # TPUs never take local ids
        if count is None:
            return ProcessSetup()
        setup = ProcessSetup("tpu", count, pid, coordinator)
    elif explicit:
        needed = (COORDINATOR, NUM_PROCESSES, PROCESS_ID)
        keys = ("coordinator_address", "num_processes", "process_id")
        missing = [name for name, key in zip(needed, keys) if key not in explicit]
        if missing == [COORDINATOR] and explicit.get("num_processes") == 1:
            return ProcessSetup(local_device_ids=explicit.get("local_device_ids"))
        if missing:
            present = [name for name, key in zip(needed, keys) if key in explicit]
            raise DistributedSetupError(
                f"{', '.join(present) or LOCAL_DEVICE_IDS} set but {', '.join(missing)} not: a "
                f"multi-process job needs all three on every process ({COORDINATOR}=host:port "
                f"of process 0, {NUM_PROCESSES}=N, {PROCESS_ID}=0..N-1), or a launcher JAX "
                "detects (srun, a Cloud TPU pod). Unset them all for a single process.")
        setup = ProcessSetup("explicit", explicit["num_processes"], explicit["process_id"],
                             explicit["coordinator_address"], explicit.get("local_device_ids"))
    else:
        return ProcessSetup()

    if setup.num_processes < 1 or not 0 <= setup.process_id < setup.num_processes:
        raise DistributedSetupError(
            f"process id {setup.process_id} is not in 0..{setup.num_processes - 1} "
            f"({setup.platform}): give each of the {setup.num_processes} processes its own id.")
    if "local_device_ids" in explicit and setup.platform != "tpu":
        setup = dataclasses.replace(setup, local_device_ids=explicit["local_device_ids"])
    return setup


def initialize() -> ProcessSetup:
    """jax.distributed.initialize() with what detect() found, when there are several processes.

    Call it before anything touches a device; a second call, or a single process, does nothing.
    """
    import jax

    setup = detect()
    if not setup.is_multi_process or jax.distributed.is_initialized():
        return setup
    log.info("jax.distributed: %s", setup.describe())
    jax.distributed.initialize(
        coordinator_address=setup.coordinator_address, num_processes=setup.num_processes,
        process_id=setup.process_id,
        local_device_ids=list(setup.local_device_ids) if setup.local_device_ids else None,
        # Everything is resolved: JAX must not re-detect (it would narrow SLURM to one GPU).
        cluster_detection_method="deactivate",
        initialization_timeout=int(os.environ.get(INIT_TIMEOUT, "300")))
    return setup


def is_chief() -> bool:
    """Whether this process writes the job's shared side files (process 0; any process of a
    program that never imported JAX is alone)."""
    if "jax" not in sys.modules:
        return True
    import jax

    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """All processes wait here (a no-op with one): after process 0 wrote a shared file, before
    any process reads it or exits."""
    if "jax" not in sys.modules:
        return
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def chief_integers(values) -> tuple[int, ...]:
    """Process 0's `values` (int32s) on every process (a collective with several processes): a
    name or seed that one process draws and every process must use."""
    values = tuple(int(v) for v in values)
    if "jax" not in sys.modules:
        return values
    import jax

    if jax.process_count() == 1:
        return values
    import numpy as np
    from jax.experimental import multihost_utils

    chief = multihost_utils.broadcast_one_to_all(np.asarray(values, np.int32))
    return tuple(int(v) for v in np.asarray(chief))


def all_processes_agree(value: bool) -> bool:
    """True when `value` is True on every process (a collective with several processes)."""
    return worst_across_processes(0 if value else 1) == 0


def worst_across_processes(value: int) -> int:
    """The largest of every process's `value` (a collective with several processes)."""
    if "jax" not in sys.modules:
        return value
    import jax

    if jax.process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.array([value], np.int32))))
