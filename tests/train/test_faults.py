"""Faults never lose a run: restore tells damage from machine faults, checksums catch flipped
bits, divergence stops the run without saving or exporting it, save errors are one clear line."""

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gemb import paths
from gemb.train import checkpointing, checksums, run, trainer

from helpers import (LOSS, OPTIMIZER, SMALL, one_device_env, partitioner_for, save_checkpoints,
                     synthetic)


def _train(model_dir, **overrides):
    kwargs = dict(model_dir=str(model_dir), encoder=SMALL, loss=LOSS, optimizer=OPTIMIZER,
                  data=synthetic(batch_size=8, num_negatives=0),
                  num_steps=4, log_every=1,
                  checkpoint=checkpointing.CheckpointConfig(save_every=2, keep=5),
                  partitioner=lambda: partitioner_for((1, 1, 1), 1))
    kwargs.update(overrides)
    return run.train(**kwargs)


def _step_dirs(model_dir):
    folder = Path(model_dir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


# --------------------------------------------------------------------------- checksums


def test_checksum_changes_for_every_single_bit_flip():
    values = {"f32": np.linspace(-3, 3, 6, dtype=np.float32),
              "i32": np.arange(6, dtype=np.int32),
              "bf16": np.linspace(-1, 1, 6).astype(jax.numpy.bfloat16)}
    reference = checksums.tree_checksums(values)
    for name, array in values.items():
        words = array.view(np.uint16 if array.itemsize == 2 else np.uint32)
        for index in range(array.size):
            for bit in range(8 * array.itemsize):
                flipped = words.copy()
                flipped[index] ^= type(flipped[index])(1 << bit)
                changed = dict(values, **{name: flipped.view(array.dtype)})
                assert checksums.tree_checksums(changed)[name] != reference[name], (name, index, bit)


def test_checksums_do_not_depend_on_sharding():
    array = np.random.default_rng(0).normal(size=(16, 24)).astype(np.float32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    sharded = jax.device_put(array, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("a", "b")))
    assert checksums.tree_checksums({"x": sharded}) == checksums.tree_checksums({"x": array})


def test_checksums_are_the_flat_formula_in_every_shape():
    # The formula checkpoints were written with: words of the row-major flattened bits, weighted
    # by odd multiples of two constants (mod 2**32). Computing it per axis (so that a sharded
    # array is never gathered) must not change a value, or older checkpoints would not verify.
    rng = np.random.default_rng(1)
    for shape in [(), (7,), (5, 6), (3, 4, 5)]:
        array = rng.normal(size=shape).astype(np.float32)
        words = array.reshape(-1).view(np.uint32).astype(np.uint64)
        odd = 2 * np.arange(words.size, dtype=np.uint64) + 1
        sum_a = int(((words * ((odd * 2654435761) % 2**32)) % 2**32).sum() % 2**32)
        sum_b = int((((words ^ (words >> 15)) * ((odd * 2246822519) % 2**32)) % 2**32).sum() % 2**32)
        assert checksums.tree_checksums({"x": array})["x"] == f"{sum_a:08x}-{sum_b:08x}", shape


# ------------------------------------------------------------------------------- restore


@pytest.mark.parametrize("error,damage", [
    (OSError(errno.EIO, "Input/output error"), False),
    (MemoryError(), False),
    (ValueError("UNAVAILABLE: Error reading gs://bucket/run: 503"), False),
    (ValueError("RESOURCE_EXHAUSTED: out of memory while reading"), False),
    (RuntimeError("XLA runtime error"), False),
    (json.JSONDecodeError("Expecting value", "x", 0), True),
    (FileNotFoundError(errno.ENOENT, "No such file", "checkpoints/3/state"), True),
    (ValueError("OUT_OF_RANGE: Error reading \"a/0\": Requested byte range is not valid"), True),
    (ValueError("DATA_LOSS: Error reading local file"), True),
    (KeyError('Item "state" was not found in the checkpoint. Available items: []'), True),
    (checkpointing.CheckpointDamaged("checksum mismatch"), True),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v))
def test_damage_is_told_from_machine_faults(error, damage):
    assert checkpointing.is_damage(error) is damage
    # Wrapped the way orbax wraps tensorstore errors, the verdict is the same.
    try:
        try:
            raise error
        except BaseException as inner:
            raise Exception("Encountered error while reading array index") from inner
    except Exception as outer:
        assert checkpointing.is_damage(outer) is damage


@pytest.mark.parametrize("injected", [OSError(errno.EIO, "Input/output error"), MemoryError()],
                         ids=["EIO", "MemoryError"])
def test_transient_restore_error_stops_the_run_and_moves_nothing(tmp_path, monkeypatch, injected):
    save_checkpoints(tmp_path, {2, 3})

    def failing_restore(self, step, *args, **kwargs):
        raise injected

    monkeypatch.setattr(ocp.CheckpointManager, "restore", failing_restore)
    with pytest.raises(checkpointing.CheckpointRestoreError, match="nothing was moved"):
        _train(tmp_path)
    assert _step_dirs(tmp_path) == [2, 3]
    assert not (tmp_path / "checkpoints" / checkpointing.CORRUPT_DIRNAME).exists()


def test_flipped_bits_are_quarantined_or_restored_exactly(tmp_path):
    """tensorstore reads many flipped bits back as other values without an error; with the
    checksums every flip either restores exactly what was saved or is quarantined."""
    layout, meta, saved = save_checkpoints(tmp_path / "original", {1})
    files = sorted(p.relative_to(tmp_path / "original") for p in
                   (tmp_path / "original" / "checkpoints" / "1" / "state").rglob("*")
                   if p.is_file() and "ocdbt.process" in str(p) and "/d/" in str(p))
    assert files, "orbax's OCDBT data files moved; update this test"
    outcomes = []
    for trial, (name, fraction) in enumerate((f, x) for f in files for x in (0.2, 0.5, 0.8)):
        run = tmp_path / f"trial{trial}"
        shutil.copytree(tmp_path / "original", run)
        data = bytearray((run / name).read_bytes())
        data[int(len(data) * fraction)] ^= 0x04
        (run / name).write_bytes(bytes(data))
        ckpt = checkpointing.RunCheckpointer(run)
        try:
            restored = ckpt.restore_latest(layout.abstract, meta)
        except checkpointing.CheckpointRestoreError as error:  # the only step was damaged
            assert "none could be restored" in str(error)
            assert _step_dirs(run) == []
            outcomes.append("quarantined")
            continue
        finally:
            ckpt.close()
        state, _, _ = restored
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                     state.to_tree(), saved[1])
        outcomes.append("exact")
    assert "quarantined" in outcomes


def test_checksum_mismatch_alone_quarantines(tmp_path, capsys):
    """A value changed behind orbax's back (here: rewritten through orbax itself, so every file
    is well-formed) is caught by the checksum in the meta record."""
    layout, meta, saved = save_checkpoints(tmp_path, {1, 2}, async_save=False)
    step_dir = tmp_path / "checkpoints" / "2"
    tree = jax.tree.map(np.asarray, saved[2])
    tree["params"]["encoder"]["head"]["dense_0"] = tree["params"]["encoder"]["head"]["dense_0"] + 1
    shutil.rmtree(step_dir / "state")
    with ocp.StandardCheckpointer() as writer:
        writer.save((step_dir / "state").absolute(), tree)
    ckpt = checkpointing.RunCheckpointer(tmp_path)
    state, _, _ = ckpt.restore_latest(layout.abstract, meta)
    ckpt.close()
    assert int(state.step) == 1
    out = capsys.readouterr().out
    assert "checksum mismatch" in out and "params/encoder/head/dense_0" in out


def test_all_damaged_stops_unless_fresh_start_is_allowed(tmp_path, capsys):
    save_checkpoints(tmp_path, {1, 2})
    for step in (1, 2):
        (tmp_path / "checkpoints" / str(step) / "meta" / "metadata").write_text("{not json")
    with pytest.raises(checkpointing.CheckpointRestoreError, match="corrupt/"):
        _train(tmp_path)
    assert _step_dirs(tmp_path) == []
    assert len(list((tmp_path / "checkpoints" / "corrupt").iterdir())) == 2
    # Rerunning after quarantine: no checkpoint is left, so it is a plain fresh start.
    summary = _train(tmp_path, num_steps=2)
    assert summary["final_step"] == 2
    assert "from scratch at step 0" in capsys.readouterr().out


def test_allow_fresh_start_says_so(tmp_path, capsys):
    save_checkpoints(tmp_path, {1})
    (tmp_path / "checkpoints" / "1" / "meta" / "metadata").write_text("{not json")
    summary = _train(tmp_path, num_steps=2, allow_fresh_start=True)
    out = capsys.readouterr().out
    assert summary["final_step"] == 2
    assert "starting from scratch because allow_fresh_start=True" in out


def test_resume_allows_a_new_remat_policy_and_warns_on_a_new_batch_size(tmp_path, capsys):
    _train(tmp_path, num_steps=2)
    capsys.readouterr()
    remat = SMALL.replace(transformer=SMALL.transformer.replace(remat_policy="full"))
    summary = _train(tmp_path, num_steps=4, encoder=remat,
                     data=synthetic(batch_size=16, num_negatives=0))
    out = capsys.readouterr().out
    assert summary["final_step"] == 4 and "Resumed" in out
    assert "changed compute settings" in out and "remat_policy: 'none' -> 'full'" in out
    assert "WARNING: " in out and "data.batch_size=8 and this run uses 16" in out
    # A change that shapes the saved state is still refused.
    wider = SMALL.replace(head_dims=(48,), matryoshka_dims=(48, 24))
    with pytest.raises(ValueError, match="another model"):
        _train(tmp_path, num_steps=6, encoder=wider)


# ----------------------------------------------------------------------------- divergence


DIVERGING = dict(optimizer=OPTIMIZER.__class__(learning_rate=1e10, warmup_steps=1))


def _all_params_finite(model_dir, step):
    manager = ocp.CheckpointManager((Path(model_dir) / "checkpoints").absolute(),
                                    item_names=("state", "data", "meta"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["state"]["params"]))


def test_divergence_stops_after_k_nonfinite_steps_without_saving_them(tmp_path, capsys):
    step = trainer.StepConfig(max_consecutive_nonfinite=3)
    with pytest.raises(run.TrainingDiverged) as raised:
        _train(tmp_path, num_steps=20, step=step, **DIVERGING)
    message = str(raised.value)
    first_bad = int(message.split("the first at step ")[1].split(" ")[0])
    assert "3 non-finite steps in a row" in message
    saved = _step_dirs(tmp_path)
    assert saved and max(saved) < first_bad
    assert f"last good checkpoint is step {max(saved)}" in message
    out = capsys.readouterr().out
    assert "no checkpoint saved, the step was not finite" in out


def test_divergence_without_any_checkpoint_says_so(tmp_path):
    step = trainer.StepConfig(max_consecutive_nonfinite=2)
    with pytest.raises(run.TrainingDiverged, match="No checkpoint was saved before it"):
        _train(tmp_path, num_steps=20, step=step,
               checkpoint=checkpointing.CheckpointConfig(save_every=100), **DIVERGING)
    assert _step_dirs(tmp_path) == []


def test_stop_policy_message_is_true_without_a_checkpoint(tmp_path):
    with pytest.raises(run.TrainingDiverged, match="No checkpoint was saved before it"):
        _train(tmp_path, num_steps=20, step=trainer.StepConfig(nan_policy="stop"),
               checkpoint=checkpointing.CheckpointConfig(save_every=100), **DIVERGING)


def test_nonfinite_last_step_is_not_saved_or_exported(tmp_path, capsys):
    step = trainer.StepConfig(max_consecutive_nonfinite=50)
    with pytest.raises(run.TrainingDiverged, match="not exporting"):
        _train(tmp_path, num_steps=6, step=step, export=True, **DIVERGING)
    assert not (tmp_path / "export").exists()
    for saved in _step_dirs(tmp_path):
        assert _all_params_finite(tmp_path, saved)
    assert 6 not in _step_dirs(tmp_path)
    assert "steps skipped as not finite" in capsys.readouterr().out


@pytest.mark.slow
def test_diverging_gemb_train_exits_nonzero(tmp_path):
    command = [sys.executable, "-m", "gemb.train", "--gin_file=gin/runs/tiny_synthetic.gin",
               f"--gin.MODEL_DIR='{tmp_path}'", "--gin.train.num_steps=30",
               "--gin.encoder_config.num_layers=2", "--gin.OptimizerConfig.learning_rate=1e10",
               "--gin.CheckpointConfig.save_every=2"]
    env = one_device_env()
    result = subprocess.run(command, cwd=paths.REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode != 0, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("gemb train: training diverged: 5 non-finite steps in a row"), last
    first_bad = int(last.split("the first at step ")[1].split(" ")[0])
    assert max(_step_dirs(tmp_path)) < first_bad
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------ saving


def test_simulated_disk_full_in_a_background_save_is_one_clear_error(tmp_path, monkeypatch,
                                                                     capsys):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    async def disk_full(self, x, directory):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "metadata"))

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full)
    with pytest.raises(checkpointing.CheckpointSaveError) as raised:
        _train(tmp_path, num_steps=6)
    message = str(raised.value)
    assert "cannot save checkpoint step 2" in message
    assert "No space left on device (ENOSPC)" in message and " free there" in message
    assert str(tmp_path / "checkpoints") in message
    assert "no checkpoint of this run exists yet" in message
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err


def _can_mount_tmpfs(target):
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)],
                            capture_output=True)
    return result.returncode == 0


@pytest.mark.slow
def test_real_disk_full_on_a_small_tmpfs(tmp_path):
    run = tmp_path / "run"
    if not _can_mount_tmpfs(run):
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN); the simulated "
                    "ENOSPC test covers the same path")
    try:
        command = [sys.executable, "-m", "gemb.train", "--gin_file=gin/runs/tiny_synthetic.gin",
                   f"--gin.MODEL_DIR='{run}'", "--gin.train.num_steps=12",
                   "--gin.encoder_config.num_layers=2"]
        env = one_device_env()
        result = subprocess.run(command, cwd=paths.REPO_ROOT, env=env, capture_output=True,
                                text=True, timeout=600)
    finally:
        subprocess.run(["umount", str(run)], capture_output=True)
    assert result.returncode != 0
    errors = result.stderr.strip().splitlines()
    assert "No space left on device" in errors[-1] and "free there" in errors[-1], result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(errors) <= 3, result.stderr
