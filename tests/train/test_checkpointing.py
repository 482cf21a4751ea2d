"""Checkpoints: round trip, damaged latest -> previous, another model, init_from."""

import jax
import numpy as np
import pytest

from gemb.checkpoints import model_dir as model_dir_lib
from gemb.models.config import TINY_ENCODER
from gemb.train import checkpointing, run
from gemb.train.data import SyntheticData

from helpers import (LOSS, OPTIMIZER, SMALL, build, partitioner_for, save_checkpoints,
                     synthetic_batches)


def test_round_trip_and_damaged_latest_falls_back(tmp_path, capsys):
    layout, meta, saved = save_checkpoints(tmp_path, {2, 3})
    ckpt = checkpointing.RunCheckpointer(tmp_path)
    state, data_state, _ = ckpt.restore_latest(layout.abstract, meta)
    assert int(state.step) == 3 and data_state["batch_index"] == 3
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.params,
                 saved[3]["params"])
    # Damage step 3: truncate every array file of its state.
    for path in (tmp_path / "checkpoints" / "3" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "metadata" not in path.name:
            path.write_bytes(b"\0" * 3)
    ckpt = checkpointing.RunCheckpointer(tmp_path)
    state, data_state, _ = ckpt.restore_latest(layout.abstract, meta)
    assert int(state.step) == 2 and data_state["batch_index"] == 2
    assert "checkpoint step 3" in capsys.readouterr().out
    assert ckpt.all_steps() == [2]
    assert any((tmp_path / "checkpoints" / "corrupt").iterdir())


def test_run_dir_of_another_model_is_an_error(tmp_path):
    save_checkpoints(tmp_path, {1})
    other = SMALL.replace(head_dims=(48,), matryoshka_dims=(48, 24))
    with pytest.raises(ValueError, match="another model"):
        run.train(model_dir=str(tmp_path), encoder=other, data=SyntheticData(batch_size=8),
                         num_steps=2, loss=LOSS, optimizer=OPTIMIZER)


def test_missing_init_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run.train(model_dir=str(tmp_path / "run"), encoder=TINY_ENCODER,
                         data=SyntheticData(batch_size=8), num_steps=2,
                         init_from=str(tmp_path / "nowhere"))


def test_mesh_device_mismatch_and_indivisible_batch_fail_before_training(tmp_path):
    from gemb.train import gin_registry

    with pytest.raises(ValueError, match="needs 6 devices but 8 are available"):
        run.train(model_dir=str(tmp_path / "a"), encoder=TINY_ENCODER,
                         data=SyntheticData(batch_size=8), num_steps=2,
                         partitioner=lambda: gin_registry.partitioner((3, 2, 1)))
    with pytest.raises(ValueError, match="cannot be split over the data axes"):
        run.train(model_dir=str(tmp_path / "b"), encoder=TINY_ENCODER,
                         data=SyntheticData(batch_size=12), num_steps=2,
                         partitioner=lambda: gin_registry.partitioner((8, 1, 1)))


def test_init_from_model_folder_with_renames_and_unscanned_layout(tmp_path):
    partitioner = partitioner_for((1, 1, 1), 1)
    layout, state, _ = build(partitioner, encoder=TINY_ENCODER)
    params = jax.tree.map(np.asarray, state.params["encoder"])
    # A "converted" folder whose head is stored under another name.
    stored = dict(params)
    stored["projection"] = stored.pop("head")
    model_dir_lib.save_model_dir(tmp_path / "model", TINY_ENCODER, stored, {"source": "test"})
    with pytest.raises(ValueError, match="lacks parameters"):
        checkpointing.load_init_params(tmp_path / "model", layout.abstract_params["encoder"])
    loaded = checkpointing.load_init_params(tmp_path / "model", layout.abstract_params["encoder"],
                                            renames=[("^projection/", "head/")],
                                            target_config=TINY_ENCODER)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded, params)
    # The same folder into an unscanned model: layers are re-laid out, values unchanged.
    unscanned = TINY_ENCODER.replace(
        transformer=TINY_ENCODER.transformer.replace(scan_layers=False))
    un_layout, _, _ = build(partitioner, encoder=unscanned)
    loaded = checkpointing.load_init_params(tmp_path / "model",
                                            un_layout.abstract_params["encoder"],
                                            renames=[("^projection/", "head/")],
                                            target_config=unscanned)
    np.testing.assert_array_equal(
        np.asarray(loaded["transformer"]["layer_1"]["mlp"]["linear"]),
        params["transformer"]["scanned_layers"]["layer_1"]["mlp"]["linear"][0])


def test_init_from_a_run_reads_params_straight_into_their_shardings(tmp_path):
    """From a run directory: only params/encoder is read (partial restore), each leaf into
    its fsdp sharding and cast on the devices."""
    _, _, saved = save_checkpoints(tmp_path, {2})
    fsdp = partitioner_for((1, 8, 1), 8)
    bf16 = SMALL.replace(transformer=SMALL.transformer.replace(param_dtype="bfloat16"))
    layout, _, _ = build(fsdp, encoder=bf16)
    abstract = layout.abstract_params["encoder"]
    loaded = checkpointing.load_init_params(tmp_path, abstract, target_config=bf16)
    flat = dict(jax.tree_util.tree_leaves_with_path(loaded))
    specs = dict(jax.tree_util.tree_leaves_with_path(abstract))
    sharded = 0
    for path, value in flat.items():
        assert value.sharding == specs[path].sharding and value.dtype == specs[path].dtype
        sharded += not value.sharding.is_fully_replicated
    assert sharded >= 4  # the big matrices are split over fsdp, not replicated
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(
        np.asarray(a, np.float32), np.asarray(b.astype(jax.numpy.bfloat16), np.float32)),
        loaded, saved[2]["params"]["encoder"])


@pytest.mark.parametrize("mode,best_step", [("max", 2), ("min", 3)])
def test_keep_best_keeps_the_best_step_beside_the_newest(tmp_path, mode, best_step):
    partitioner = partitioner_for((1, 1, 1), 1)
    _, state, steps = build(partitioner)
    config = checkpointing.CheckpointConfig(keep=1, keep_best=1, best_metric="ndcg",
                                            best_mode=mode, async_save=False)
    ckpt = checkpointing.RunCheckpointer(tmp_path, config)
    meta = run._model_meta(SMALL, LOSS, OPTIMIZER)
    scores = {1: 0.30, 2: 0.90, 3: 0.10, 4: 0.50}
    for step, batch in zip(sorted(scores), synthetic_batches(4)):
        state, _ = steps.train_step(state, batch)
        ckpt.save(step, state, {"batch_index": step}, meta, metrics={"ndcg": scores[step]})
    ckpt.close()
    assert checkpointing.RunCheckpointer(tmp_path, config).all_steps() == sorted({best_step, 4})
