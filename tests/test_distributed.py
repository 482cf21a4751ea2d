"""Launcher tests: given each platform's environment, the process count, process id,
coordinator and local devices gemb derives (JAX's own detection where JAX has one)."""

import http.server
import threading

import pytest

from gemb import distributed

# Every variable any platform's detection reads: each test starts from none of them.
_PLATFORM_VARS = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS",
    "JAX_COORDINATOR_PORT", "JAX_COORDINATOR_IP", "NNODES", "NODE_RANK",
    "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
    "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_NODEID", "SLURM_STEP_TASKS_PER_NODE",
    "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_GPUS_ON_NODE",
    "CUDA_VISIBLE_DEVICES", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID",
    "TPU_SKIP_MDS_QUERY", "MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID",
    "MEGASCALE_COORDINATOR_ADDRESS", "GCE_METADATA_IP", "OMPI_MCA_orte_hnp_uri",
    "PMI_RANK", "KUBERNETES_SERVICE_HOST",
)


@pytest.fixture
def env(monkeypatch):
    for name in _PLATFORM_VARS:
        monkeypatch.delenv(name, raising=False)

    def set_vars(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))

    return set_vars


def test_no_launcher_is_one_process(env):
    assert distributed.detect() == distributed.ProcessSetup()
    assert not distributed.detect().is_multi_process


def test_explicit_coordinator_count_and_id(env):
    env(JAX_COORDINATOR_ADDRESS="10.1.2.3:1234", JAX_NUM_PROCESSES=4, JAX_PROCESS_ID=3,
        JAX_LOCAL_DEVICE_IDS="2,3")
    assert distributed.detect() == distributed.ProcessSetup(
        "explicit", num_processes=4, process_id=3, coordinator_address="10.1.2.3:1234",
        local_device_ids=(2, 3))


@pytest.mark.parametrize("values, names", [
    ({"JAX_COORDINATOR_ADDRESS": "10.1.2.3:1234"}, "JAX_NUM_PROCESSES, JAX_PROCESS_ID not"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS not"),
    ({"JAX_COORDINATOR_ADDRESS": "10.1.2.3:1234", "JAX_NUM_PROCESSES": "2"},
     "JAX_PROCESS_ID not"),
])
def test_half_configured_environment_names_what_is_missing(env, values, names):
    env(**values)
    with pytest.raises(distributed.DistributedSetupError, match=names):
        distributed.detect()


@pytest.mark.parametrize("values, message", [
    ({"JAX_COORDINATOR_ADDRESS": "10.1.2.3", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     "must be host:port"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     r"process id 2 is not in 0\.\.1"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "is not a whole number"),
])
def test_inconsistent_environment_is_an_error(env, values, message):
    env(**values)
    with pytest.raises(distributed.DistributedSetupError, match=message):
        distributed.detect()


def test_one_process_explicitly_needs_no_coordinator(env):
    env(JAX_NUM_PROCESSES=1, JAX_PROCESS_ID=0)
    assert not distributed.detect().is_multi_process


def _slurm(env, *, ntasks, procid, localid, nodeid, tasks_per_node, **extra):
    env(SLURM_JOB_ID=12345, SLURM_STEP_NODELIST="gpu[007-008]", SLURM_NTASKS=ntasks,
        SLURM_PROCID=procid, SLURM_LOCALID=localid, SLURM_NODEID=nodeid,
        SLURM_STEP_NUM_NODES=2, SLURM_STEP_TASKS_PER_NODE=tasks_per_node, **extra)


# JAX's SLURM detection: coordinator = the first node of the step, port 61440 + job id % 4096.
_SLURM_COORDINATOR = f"gpu007:{61440 + 12345 % 4096}"


def test_slurm_one_task_per_node_drives_all_its_gpus(env):
    _slurm(env, ntasks=2, procid=1, localid=0, nodeid=1, tasks_per_node="1(x2)",
           SLURM_GPUS_ON_NODE=8, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    assert distributed.detect() == distributed.ProcessSetup(
        "slurm", num_processes=2, process_id=1, coordinator_address=_SLURM_COORDINATOR,
        local_device_ids=None)  # all eight (JAX alone would take [SLURM_LOCALID] = [0])


def test_slurm_one_task_per_gpu(env):
    _slurm(env, ntasks=16, procid=13, localid=5, nodeid=1, tasks_per_node="8(x2)",
           SLURM_GPUS_ON_NODE=8, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    assert distributed.detect() == distributed.ProcessSetup(
        "slurm", num_processes=16, process_id=13, coordinator_address=_SLURM_COORDINATOR,
        local_device_ids=(5,))


def test_slurm_two_tasks_per_node_split_the_gpus(env):
    _slurm(env, ntasks=4, procid=3, localid=1, nodeid=1, tasks_per_node="2(x2)",
           SLURM_GPUS_ON_NODE=8)
    assert distributed.detect().local_device_ids == (4, 5, 6, 7)


def test_slurm_bound_gpus_per_task_are_all_visible_ones(env):
    # --gpus-per-task=1: SLURM already narrowed CUDA_VISIBLE_DEVICES to this task's GPU.
    _slurm(env, ntasks=16, procid=2, localid=2, nodeid=0, tasks_per_node="8(x2)",
           SLURM_GPUS_ON_NODE=8, CUDA_VISIBLE_DEVICES="2")
    assert distributed.detect().local_device_ids is None


def test_slurm_uneven_gpu_split_is_an_error(env):
    _slurm(env, ntasks=6, procid=0, localid=0, nodeid=0, tasks_per_node="3(x2)",
           SLURM_GPUS_ON_NODE=8)
    with pytest.raises(distributed.DistributedSetupError, match="cannot split them evenly"):
        distributed.detect()


def test_slurm_batch_script_without_srun_is_an_error(env):
    env(SLURM_JOB_ID=12345, SLURM_NTASKS=2)  # sbatch sets these; srun adds the step's
    with pytest.raises(distributed.DistributedSetupError, match="through srun"):
        distributed.detect()


def test_slurm_single_task_is_one_process(env):
    _slurm(env, ntasks=1, procid=0, localid=0, nodeid=0, tasks_per_node="1")
    assert not distributed.detect().is_multi_process


def test_explicit_values_override_slurm(env):
    _slurm(env, ntasks=2, procid=1, localid=0, nodeid=1, tasks_per_node="1(x2)",
           JAX_COORDINATOR_ADDRESS="head:9999")
    setup = distributed.detect()
    assert (setup.coordinator_address, setup.num_processes, setup.process_id) == (
        "head:9999", 2, 1)


def test_xpk_gpu_node_pool(env):
    env(JAX_COORDINATOR_IP="10.8.0.2", JAX_COORDINATOR_PORT=6002, NNODES=4, NODE_RANK=2)
    assert distributed.detect() == distributed.ProcessSetup(
        "xpk-gpu", num_processes=4, process_id=2, coordinator_address="10.8.0.2:6002")


@pytest.fixture
def cloud_tpu_vm(monkeypatch):
    """This process believes it runs on a Cloud TPU VM (what libtpu's presence tells JAX)."""
    from jax._src import cloud_tpu_init
    from jax._src.clusters import cloud_tpu_cluster, cluster

    for module in (cloud_tpu_init, cloud_tpu_cluster, cluster):
        monkeypatch.setattr(module, "running_in_cloud_tpu_vm", True)


def test_gke_tpu_multislice(env, cloud_tpu_vm):
    # GKE/xpk: a v5e-16 slice has 4 hosts; slice 1 of 2, worker 2 of that slice.
    env(TPU_WORKER_HOSTNAMES="10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4", TPU_WORKER_ID=2,
        TPU_SKIP_MDS_QUERY=1, MEGASCALE_NUM_SLICES=2, MEGASCALE_SLICE_ID=1,
        MEGASCALE_COORDINATOR_ADDRESS="10.0.0.9")
    assert distributed.detect() == distributed.ProcessSetup(
        "tpu", num_processes=8, process_id=6, coordinator_address="10.0.0.9:8482")


class _MetadataServer(http.server.BaseHTTPRequestHandler):
    """The GCE metadata server's answers for worker 1 of a 4-host TPU VM pod."""

    attributes = {"agent-worker-number": "1",
                  "worker-network-endpoints": ",".join(
                      f"uid:{i}:10.128.0.{10 + i}" for i in range(4)),
                  "tpu-env": "ACCELERATOR_TYPE: 'v4-32'\n"}

    def do_GET(self):  # noqa: N802 (http.server's name)
        key = self.path.rsplit("/", 1)[-1]
        body = self.attributes.get(key)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write((body or "").encode())

    def log_message(self, *args):
        pass


def test_gce_tpu_vm_pod(env, cloud_tpu_vm):
    server = http.server.HTTPServer(("127.0.0.1", 0), _MetadataServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env(GCE_METADATA_IP=f"127.0.0.1:{server.server_port}")
        assert distributed.detect() == distributed.ProcessSetup(
            "tpu", num_processes=4, process_id=1, coordinator_address="10.128.0.10:8482")
    finally:
        server.shutdown()


def test_cli_reports_a_half_configured_environment(env, capsys):
    from gemb import cli

    env(JAX_COORDINATOR_ADDRESS="10.1.2.3:1234")
    assert cli.main(["embed", "--help"]) == 2
    assert "gemb embed: error: JAX_COORDINATOR_ADDRESS set but" in capsys.readouterr().err
