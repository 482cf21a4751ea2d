"""`gemb train` as 2 and 4 JAX processes equals one process on the same 8-device mesh, in the
padded and packed layouts, with and without gradient caching, dense and blockwise attention; kill -9 of every process and a
restart continue the multi-process run bitwise."""

import random
import shutil

import numpy as np
import pytest

import mp_harness as harness

NUM_STEPS = 12  # a multiple of the save interval (3), so the last save is the newest
VARIANTS = {
    "padded": (),
    "packed": ("--gin.FeatureConverterConfig.pack=True",),
    "gradient_cache": ("--gin.train.step=@StepConfig()",
                       "--gin.StepConfig.gradient_cache_chunk=8"),
    # Each role's packed rows in 2 chunks: each process rounds its rows to 4 devices x 2; and
    # the blockwise attention backend (blocks of 4 rows: several per row, the local layer's
    # band of 4 + 2 x 4 keys inside the 16-token rows) in the multi-process runs and their
    # 1-process reference.
    "packed_gradient_cache_blockwise": (
        "--gin.FeatureConverterConfig.pack=True", "--gin.train.step=@StepConfig()",
        "--gin.StepConfig.gradient_cache_chunk=8",
        "--gin.encoder_config.attention_backend='blockwise'",
        "--gin.encoder_config.attention_block_size=4"),
}
# Every layout in 2 processes, and packed (the layout multi-host changes most) in 4, run by
# default; the other 4-process layouts (about 80 s each on 2 cores) run with `-m extended`.
CASES = [(variant, 2) for variant in VARIANTS] + [
    pytest.param(variant, 4, marks=() if variant == "packed" else pytest.mark.extended)
    for variant in VARIANTS]

pytestmark = pytest.mark.slow


# The kill and quarantine tests resume the 2-process packed run, so it saves every 3 steps; the
# other runs only compare losses and save once, at the end (each save costs a 2-core machine
# 1-2 s per process).
CHECKPOINTED = ("packed", 2)


def command(model_dir, variant, save_every=3):
    return harness.train_command(model_dir, f"--gin.train.num_steps={NUM_STEPS}",
                                 f"--gin.CheckpointConfig.save_every={save_every}",
                                 *VARIANTS[variant])


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """train_run(variant, num_processes) -> (model_dir, per-process results), each run once
    for the module (the kill test reuses the uninterrupted 2-process packed run)."""
    cache = {}

    def run(variant, num_processes):
        key = (variant, num_processes)
        if key not in cache:
            model_dir = tmp_path_factory.mktemp(f"{variant}_{num_processes}p")
            save_every = 3 if key == CHECKPOINTED else NUM_STEPS
            cache[key] = model_dir, harness.gemb(command(model_dir, variant, save_every),
                                                 num_processes)
        return cache[key]

    return run


@pytest.mark.parametrize("variant, num_processes", CASES)
def test_multi_process_losses_equal_one_process(variant, num_processes, train_run):
    model_dir, results = train_run(variant, num_processes)
    assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in results[0].output
    for result in results:
        assert (f"Process {result.process_id} of {num_processes}: feeds batch block "
                f"{result.process_id} of {num_processes}") in result.output
    losses = harness.logged_losses(model_dir)
    expected = harness.logged_losses(train_run(variant, 1)[0])
    assert sorted(losses) == sorted(expected) == list(range(1, NUM_STEPS + 1))
    np.testing.assert_allclose([losses[s] for s in sorted(expected)],
                               [expected[s] for s in sorted(expected)], rtol=0, atol=1e-5)


def test_kill_every_process_and_resume_is_bitwise_equal(train_run, tmp_path):
    reference, _ = train_run("packed", 2)
    kill_step = random.Random(12).randint(4, NUM_STEPS - 2)  # a fixed "random" step
    killed = tmp_path / "killed"
    results = harness.gemb(command(killed, "packed"), 2,
                           env_overrides={"GEMB_KILL_AFTER_STEP": str(kill_step)},
                           expect_codes=[-9, -9])
    assert all(f"GEMB_KILL_AFTER_STEP={kill_step}: killing" in r.output for r in results)
    resumed = harness.gemb(command(killed, "packed"), 2)
    assert f"from step {kill_step // 3 * 3}." in resumed[0].output, resumed[0].output
    assert harness.logged_losses(killed) == harness.logged_losses(reference)  # exact floats


def test_damaged_newest_checkpoint_is_quarantined_once_for_all_processes(train_run, tmp_path):
    reference, _ = train_run("packed", 2)
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    newest = run_dir / "checkpoints" / str(NUM_STEPS)
    for path in (newest / "state").rglob("*"):  # truncate every array file of its state
        if path.is_file() and path.stat().st_size > 0 and "metadata" not in path.name:
            path.write_bytes(b"\0" * 3)
    results = harness.gemb(command(run_dir, "packed"), 2)
    for result in results:  # both processes saw the damage and moved on together
        assert f"checkpoint step {NUM_STEPS} in" in result.output, result.output
        assert "Resumed" in result.output and f"from step {NUM_STEPS - 3}." in result.output
    assert len(list((run_dir / "checkpoints" / "corrupt").iterdir())) == 1  # moved once
    # The last 3 steps again, equal.
    assert harness.logged_losses(run_dir) == harness.logged_losses(reference)
