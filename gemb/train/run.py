"""`train()`: one whole training run, t5x style, configured by the objects gin builds.

Build the model, optimiser and mesh and check the configuration, restore the newest
checkpoint of model_dir (or initialise from init_from, or randomly), then loop: next batch ->
jitted step -> log -> eval hook -> checkpoint. This module imports no gin: gin wires train()'s
arguments in gemb/train/gin_registry.py, and `gemb train` (gemb/train/main.py) is the CLI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import jax

from gemb import distributed, paths
from gemb.data.feature_converter import num_tokens
from gemb.losses import ContrastiveLossConfig
from gemb.models.config import EncoderConfig
from gemb.partitioning.partitioner import Partitioner
from gemb.train import checkpointing, metrics_writer, optimizers, trainer
from gemb.train import flops as flops_lib
from gemb.train.model import EmbeddingModel
from gemb.train.data import DataShard, TrainingData

if TYPE_CHECKING:  # gemb.eval is imported only when a run evaluates
    from gemb.eval.hook import EvalHook

log = logging.getLogger(__name__)

OPERATIVE_CONFIG = "config.gin"
METRICS_FILE = "train_metrics.jsonl"


def _model_meta(encoder: EncoderConfig, loss: ContrastiveLossConfig,
                optimizer: optimizers.OptimizerConfig) -> dict[str, Any]:
    from gemb.checkpoints import model_dir as model_dir_lib

    return {
        "model": json.loads(json.dumps(model_dir_lib.encoder_config_to_dict(encoder))),
        # What else shapes the saved state: a change here cannot restore the old optimiser.
        "state_structure": {"freeze_patterns": list(optimizer.freeze_patterns),
                            "learnable_temperature": loss.learnable_temperature,
                            "clip_norm": bool(optimizer.clip_norm)},
    }


def _check_resumable(saved: Mapping[str, Any], expected: Mapping[str, Any], where) -> None:
    """Errors for a saved state this run cannot continue; notes for changes it can."""
    compute_changes = checkpointing.check_same_model(saved, expected, where)
    if saved.get("state_structure") != expected.get("state_structure"):
        raise ValueError(
            f"{where} was trained with {saved.get('state_structure')} but this run asks for "
            f"{expected.get('state_structure')}; the optimiser state cannot carry over. Use a new "
            "MODEL_DIR (and init_from the old run to keep its params).")
    if compute_changes:
        print(f"Resuming with changed compute settings (the saved state fits as it is): "
              f"{compute_changes}", flush=True)
    old_batch = (saved.get("data") or {}).get("batch_size")
    new_batch = expected["data"]["batch_size"]
    if old_batch is not None and new_batch is not None and old_batch != new_batch:
        message = (f"{where} was trained with data.batch_size={old_batch} and this run uses "
                   f"{new_batch}. The data iterator's saved position counts batches of the old "
                   "size, so the run continues at another point of the data (examples are "
                   "skipped or seen again), and the step count no longer measures examples the "
                   "same way; the learning-rate schedule continues by step.")
        print(f"WARNING: {message}", flush=True)


def train(
    model_dir: str = None,
    encoder: EncoderConfig = None,
    data: TrainingData = None,
    num_steps: int = None,
    partitioner: Callable[[], Partitioner] = None,
    optimizer: optimizers.OptimizerConfig = optimizers.OptimizerConfig(),
    loss: ContrastiveLossConfig = ContrastiveLossConfig(),
    step: trainer.StepConfig = trainer.StepConfig(),
    checkpoint: checkpointing.CheckpointConfig = checkpointing.CheckpointConfig(),
    init_from: Optional[str] = None,
    init_renames: Sequence[tuple[str, str]] = (),
    seed: int = 0,
    log_every: int = 10,
    eval_hook: Optional["EvalHook"] = None,
    tokenizer_dir: Optional[str] = None,
    export: bool = False,
    stop_after: Optional[int] = None,
    allow_fresh_start: bool = False,
    dry_run: bool = False,
    gin_config_text: Optional[str] = None,
    peak_flops_per_device: Optional[float] = None,
) -> dict[str, Any]:
    """Trains (or resumes) the run in model_dir; returns a summary dict.

    Args:
      model_dir: the run directory (MODEL_DIR): checkpoints/, config.gin, TensorBoard files.
      encoder: the model (gin/models/*.gin).
      data: the training input, a gemb.train.data.TrainingData (SeqioData, SyntheticData).
      num_steps: total optimiser steps of the run.
      partitioner: a callable returning the Partitioner (gin/partitioning/*.gin); default:
        data parallelism over every device.
      optimizer, loss, step, checkpoint: see their classes.
      init_from: a converted model folder or a run directory to take the initial PARAMS from
        (ignored when model_dir already has a checkpoint: that is resumed instead).
      init_renames: (regex, replacement) pairs applied to init_from's parameter paths.
      seed: rng seed of the state (random init, the head when not in init_from).
      log_every: console line, TensorBoard scalars and metrics file every N steps.
      eval_hook: evaluation tasks scored during training (gemb.eval.hook.EvalHook).
      tokenizer_dir: where the evaluators' tokenizer is (default: init_from).
      export: write the final params as a model folder MODEL_DIR/export (gemb embed / eval).
      stop_after: stop this process after this many steps (tests and time-boxed jobs); the run
        continues from its checkpoint next time.
      allow_fresh_start: when model_dir has checkpoints but every one is damaged (moved to
        checkpoints/corrupt/), start over instead of stopping with an error.
      dry_run: build and check everything (mesh, batch, model, optimiser), then return what
        was built (the Trainer too, for `gemb precompile`) before anything is written or any
        parameter is created.
      peak_flops_per_device: bf16 peak FLOP/s of one device, for the MFU of the console line
        and TensorBoard (train/mfu); default: gemb.train.flops's table of vendor peaks by device
        kind (no MFU on a device it does not list).
    """
    start_time = time.time()
    for name, value in (("model_dir", model_dir), ("encoder", encoder), ("data", data),
                        ("num_steps", num_steps)):
        if value is None:
            raise ValueError(f"train() needs {name} (gin: train.{name} = ...).")
    if not isinstance(data, TrainingData):
        raise TypeError(f"train.data is a {type(data).__name__}; it must be a "
                        "gemb.train.data.TrainingData (SeqioData, SyntheticData or your own "
                        "subclass).")
    model_dir = paths.as_path(model_dir)
    is_chief = distributed.is_chief()

    # 1. Everything that can be wrong with the configuration fails here, before any compute.
    partitioner = (partitioner or default_partitioner)()
    trainer.check_batch_size(data.batch_size, step, partitioner)
    if init_from is not None and not paths.as_path(init_from).exists():
        raise FileNotFoundError(
            f"init_from={init_from!r} does not exist. Convert a model first (gemb convert --from "
            "gemma3-270m --out DIR) or point INIT_FROM at a run directory.")
    model = EmbeddingModel(encoder, loss)
    run_trainer = trainer.Trainer(model, optimizers.make_optimizer(optimizer, num_steps),
                                  partitioner, step)
    layout = run_trainer.layout
    if dry_run:
        return {"model_dir": str(model_dir), "num_params": layout.num_params,
                "num_trainable": layout.num_trainable, "mesh": dict(partitioner.mesh.shape),
                "data": data, "eval_hook": eval_hook, "trainer": run_trainer}
    meta = _model_meta(encoder, loss, optimizer)
    meta["data"] = {"batch_size": data.batch_size}
    model_dir.mkdir(parents=True, exist_ok=True)
    ckpt = checkpointing.RunCheckpointer(model_dir, checkpoint)
    latest = ckpt.latest_step()
    if latest is not None:
        try:
            saved_meta = ckpt.read_meta(latest)
        except Exception:  # pylint: disable=broad-except
            saved_meta = None  # restore_latest below tells damage from other faults
        if saved_meta is not None:
            _check_resumable(saved_meta, meta, ckpt.directory / str(latest))

    # 2. State: resume, else init_from, else random.
    restored = None
    if latest is not None:
        restored = ckpt.restore_latest(layout.abstract, expected_meta=meta,
                                       allow_fresh_start=allow_fresh_start)
    if restored is not None:
        state, data_state, _ = restored
        print(f"Resumed {model_dir} from step {int(state.step)}.", flush=True)
    else:
        data_state = {}
        if init_from is not None:
            encoder_params = checkpointing.load_init_params(
                init_from, layout.abstract_params["encoder"], init_renames,
                target_config=encoder)
            params = layout.random_params(seed) if "log_temperature" in layout.abstract_params else {}
            params = dict(params, encoder=encoder_params)
            origin = f"params from {init_from}"
        else:
            params = layout.random_params(seed)
            origin = f"random params (seed {seed})"
        state = layout.create(params, seed)
        del params
        print(f"Starting {model_dir} from scratch at step 0 with {origin}: it has no checkpoint "
              "to resume.", flush=True)
    # This process's block of each global batch; its packed rows split evenly over its own
    # data-parallel devices and into the step's gradient-cache chunks, each microbatch's
    # examples packed into rows of their own.
    data_layout = partitioner.data_layout()
    print(f"Model {encoder.transformer.name}: {layout.num_params:,} params, "
          f"{layout.num_trainable:,} trainable; mesh {dict(partitioner.mesh.shape)}.", flush=True)
    if jax.process_count() > 1:
        print(f"Process {jax.process_index()} of {jax.process_count()}: feeds batch block "
              f"{data_layout.shard_index} of {data_layout.num_shards}.", flush=True)
    iterator = data.make(data_state, DataShard(
        data_layout.shard_index, data_layout.num_shards,
        row_multiple=trainer.packed_row_multiple(step, data.batch_size,
                                                 data_layout.local_data_parallel_size),
        pack_groups=step.microbatches))

    # 3. Logging.
    tb, metrics_file = None, None
    if is_chief:
        with _writing(model_dir, ckpt):
            tb = metrics_writer.TensorBoardWriter(model_dir / "train")
            # The run directory carries its tokenizer, so exports, soups and init_from of this
            # run need nothing else.
            from gemb.checkpoints import model_dir as model_dir_lib

            model_dir_lib.copy_tokenizer(tokenizer_dir or init_from, model_dir)
            if gin_config_text:
                (model_dir / OPERATIVE_CONFIG).write_text(gin_config_text)
                tb.text(int(state.step), "gin/operative_config", _markdown(gin_config_text))
            # Steps after the restored one are trained again: their old records (and
            # TensorBoard points) are dropped, so every step appears once.
            metrics_file = metrics_writer.open_metrics_file(model_dir / METRICS_FILE,
                                                            keep_through_step=int(state.step))
            tb.purge_from(int(state.step) + 1)
    peak_per_device = flops_lib.peak_flops_per_device(override=peak_flops_per_device)
    if peak_per_device is None:
        print(f"MFU not reported: no bf16 peak is known for device kind "
              f"{jax.devices()[0].device_kind!r}; set train.peak_flops_per_device = <FLOP/s of "
              "one device> to report it.", flush=True)
    console = metrics_writer.ConsoleLogger(
        num_steps, log_every,
        peak_flops=peak_per_device * jax.device_count() if peak_per_device else None)
    eval_results: dict[int, dict[str, float]] = {}
    eval_encoder = None
    if eval_hook is not None and eval_hook.task_list:
        from gemb.eval.hook import TrainingEncoder

        eval_encoder = TrainingEncoder(encoder, tokenizer_dir or init_from, partitioner,
                                       eval_hook.max_length, eval_hook.batch_size)

    def run_eval(at_step: int) -> dict[str, float]:
        from gemb.eval.hook import format_results

        results = eval_hook.run(at_step, eval_encoder.with_params(state.params["encoder"]))
        eval_results[at_step] = results
        print(f"eval step {at_step}: {format_results(results)}", flush=True)
        if tb:
            with _writing(model_dir / "train", ckpt):
                tb.scalars(at_step, {f"eval/{k}": v for k, v in results.items()})
                tb.flush()
        return results

    first_step = int(state.step)
    if eval_encoder is not None and eval_hook.at_start and first_step == 0:
        run_eval(0)
    console.start(first_step)
    loop_start = time.time()
    last_step = num_steps if stop_after is None else min(num_steps, first_step + stop_after)
    guard = DivergenceGuard(step.nan_policy, step.max_consecutive_nonfinite, ckpt)
    kill_after = _kill_after_step()

    def settle(done: int, metrics: Mapping[str, jax.Array], tokens: int, model_flops: int
               ) -> bool:
        """Reads a dispatched step's results (waits for it): the divergence guard, the log."""
        finite = bool(metrics["finite"])
        console.add_tokens(tokens)  # counted as the step is read, in the window it ends in
        console.add_flops(model_flops)
        ckpt.check_for_errors()  # a failed background save stops the run now
        if done == first_step + 1:
            # The first step includes compilation: report it apart and keep it out of the
            # rates, which would otherwise understate steps/s and tokens/s for a whole window.
            print(f"step {done}: compiled and ran in {time.time() - loop_start:.1f} s",
                  flush=True)
            console.start(done)
        guard.record(done, finite, metrics)  # raises TrainingDiverged
        if done % log_every == 0 or done == num_steps:
            host = {k: float(v) for k, v in metrics.items()}
            rates = console.maybe_log(done, host) or {}
            if is_chief:
                with _writing(model_dir / METRICS_FILE, ckpt):
                    tb.scalars(done, {**{f"train/{k}": v for k, v in host.items()},
                                      **{f"train/{k}": v for k, v in rates.items()}})
                    metrics_file.write(json.dumps({"step": done, **host}) + "\n")
                    # Flushed at every logged step, so a crash loses no logged point.
                    metrics_file.flush()
                    tb.flush()
        return finite

    def next_batch() -> tuple[dict[str, jax.Array], Mapping[str, int], int, int]:
        """The next batch on the mesh, the data position after it, and its global tokens and
        model FLOPs (this process's block times the number of blocks, as for tokens)."""
        features = next(iterator)
        tokens = num_tokens(features) * data_layout.num_shards
        model_flops = (flops_lib.train_step_flops(encoder, features) * data_layout.num_shards
                       if console.peak_flops else 0)
        return run_trainer.place(features), iterator.state, tokens, model_flops

    # Steps are dispatched without waiting for the previous one: while the device runs step N
    # the host prepares and places batch N+1, then reads step N-1's finite flag (done by now),
    # so the device never waits for the host. A step whose state is needed at once (save,
    # eval, the last step, the first one, which compiles) is read before going on, and the
    # next batch is read after it.
    unsettled = None  # (step, metrics, tokens, model_flops) dispatched but not yet read
    try:
        upcoming = next_batch() if first_step < last_step else None
        for current in range(first_step, last_step):
            done = current + 1
            # position: the data after this step's batch
            batch, position, tokens, model_flops = upcoming
            state, metrics = run_trainer.train_step(state, batch)
            evaluate = eval_encoder is not None and eval_hook.due(done, num_steps)
            save = done % checkpoint.save_every == 0 or done in (num_steps, last_step)
            read_now = current == first_step or evaluate or save or kill_after == done
            if not read_now:
                upcoming = next_batch()  # overlaps the step
            if unsettled is not None:
                settle(*unsettled)
                unsettled = None
            if not read_now:
                unsettled = (done, metrics, tokens, model_flops)
                continue
            finite = settle(done, metrics, tokens, model_flops)
            results = None
            if finite and evaluate:
                results = run_eval(done)
                console.start(done)  # evaluation time is not training throughput
            if save:
                if finite:
                    ckpt.save(done, state, position, meta,
                              metrics=results if checkpoint.keep_best else None,
                              force=done == num_steps or done == last_step)
                else:
                    print(f"step {done}: no checkpoint saved, the step was not finite (the "
                          "last checkpoint keeps the state before it).", flush=True)
            if kill_after == done:
                _kill_self(ckpt, done)
            if done < last_step:
                # After the save: a data error reading ahead cannot cost this step's checkpoint.
                upcoming = next_batch()
    except BaseException:
        ckpt.close(quiet=True)  # the error in flight is the one to report
        raise
    else:
        ckpt.close()  # the last save must land before the run reports success
    finally:
        # Closing flushes; after a full disk that fails again, and the first error is the one.
        with contextlib.suppress(OSError):
            if metrics_file:
                metrics_file.close()
            if tb:
                tb.close()
    trained = int(state.step) - first_step
    if guard.skipped:
        print(f"{guard.skipped} of {trained} steps skipped as not finite "
              f"(step.nan_policy='{step.nan_policy}').", flush=True)
    if 0 in eval_results and num_steps in eval_results:
        before, after = eval_results[0], eval_results[num_steps]
        print("Retrieval quality before -> after training:", flush=True)
        for key in sorted(after):
            print(f"  {key:<36} {before.get(key, float('nan')):.4f} -> {after[key]:.4f}",
                  flush=True)
    if export and int(state.step) == num_steps:
        if not guard.last_step_finite:
            raise TrainingDiverged(f"not exporting {model_dir / 'export'}: the last step "
                                   f"({num_steps}) was not finite.")
        export_model_dir(model_dir / "export", encoder, state.params["encoder"], model_dir)
    summary = {"model_dir": str(model_dir), "final_step": int(state.step),
               "wall_seconds": time.time() - start_time, "eval": eval_results,
               "skipped_steps": guard.skipped}
    return summary


@contextlib.contextmanager
def _writing(path: Path, ckpt: checkpointing.RunCheckpointer):
    """An OSError while writing the run's files becomes RunWriteError: one line naming the
    file, the reason and the free space, instead of a traceback."""
    try:
        yield
    except OSError as error:
        where = Path(error.filename) if getattr(error, "filename", None) else path
        raise checkpointing.RunWriteError(checkpointing.describe_write_failure(
            "write", where, error, ckpt.resume_note())) from error


class TrainingDiverged(FloatingPointError):
    """The run produced non-finite steps it cannot recover from (see StepConfig.nan_policy)."""


class DivergenceGuard:
    """Counts non-finite steps; stops the run on the first one ('stop') or after
    max_consecutive in a row ('skip' / 'ignore'), naming the first bad step and the last
    checkpoint saved before it."""

    def __init__(self, nan_policy: str, max_consecutive: int, ckpt: checkpointing.RunCheckpointer):
        self.nan_policy = nan_policy
        self.max_consecutive = max_consecutive
        self.ckpt = ckpt
        self.skipped = 0
        self.first_bad_step: int | None = None
        self.in_a_row = 0
        self.last_step_finite = True

    def record(self, step: int, finite: bool, metrics: Mapping[str, jax.Array]) -> None:
        self.last_step_finite = finite
        if finite:
            self.in_a_row, self.first_bad_step = 0, None
            return
        self.in_a_row += 1
        if self.first_bad_step is None:
            self.first_bad_step = step
        if self.nan_policy == "skip":
            self.skipped += 1
        values = (f"loss {float(metrics['loss'])}, grad norm {float(metrics['grad_norm'])}, "
                  f"update norm {float(metrics['update_norm'])}")
        if self.nan_policy == "stop":
            raise TrainingDiverged(f"step {step} is not finite ({values}); stopping "
                                   f"(step.nan_policy='stop'). {self._resume_hint()}")
        action = "update skipped" if self.nan_policy == "skip" else "applied anyway (nan_policy='ignore')"
        print(f"step {step}: not finite ({values}); {action} "
              f"[{self.in_a_row} in a row, limit {self.max_consecutive}].", flush=True)
        if self.in_a_row >= self.max_consecutive:
            raise TrainingDiverged(
                f"training diverged: {self.in_a_row} non-finite steps in a row, the first at step "
                f"{self.first_bad_step} (limit: step.max_consecutive_nonfinite="
                f"{self.max_consecutive}). {self._resume_hint()}")

    def _resume_hint(self) -> str:
        self.ckpt.wait()  # a save still in flight is of a good step: count it
        good = [s for s in self.ckpt.all_steps() if s < (self.first_bad_step or 0)]
        if good:
            hint = (f"The last good checkpoint is step {good[-1]} in {self.ckpt.directory}; a "
                    "rerun resumes from it (lower the learning rate or fix the data first).")
            if good[-1] == self.first_bad_step - 1:
                hint += (" The bad steps start right after it, so its params may already be "
                         "the cause: if the rerun diverges again, start from an earlier step.")
            return hint
        return ("No checkpoint was saved before it, so a rerun starts again from step 0; lower "
                "the learning rate or fix the data first.")


_KILL_AFTER_STEP_ENV = "GEMB_KILL_AFTER_STEP"


def _kill_after_step() -> int | None:
    """A fault drill for tests: GEMB_KILL_AFTER_STEP=N makes the process SIGKILL itself right
    after step N, once every checkpoint it started is on disk, like a machine that dies there."""
    value = os.environ.get(_KILL_AFTER_STEP_ENV)
    return int(value) if value else None


def _kill_self(ckpt: checkpointing.RunCheckpointer, step: int) -> None:
    """SIGKILL after step N. Several processes first meet at a barrier (all finished step N and
    its saves), and in a job that owns its process group (gemb.local_processes) process 0 kills
    the whole group at once, as a preemption does; dying one by one, a process still inside a
    collective with one that is already gone would fail with a connection error instead."""
    import signal

    from gemb.local_processes import OWN_PROCESS_GROUP_ENV

    ckpt.wait()
    print(f"{_KILL_AFTER_STEP_ENV}={step}: killing this process (SIGKILL).", flush=True)
    if jax.process_count() > 1:
        distributed.sync_processes(f"{_KILL_AFTER_STEP_ENV}={step}")
        if os.environ.get(OWN_PROCESS_GROUP_ENV) == "1":
            if distributed.is_chief():
                os.killpg(os.getpgrp(), signal.SIGKILL)
            while True:  # the other processes wait for process 0's kill of the group
                time.sleep(60)
    os.kill(os.getpid(), signal.SIGKILL)


def export_model_dir(out: Path, encoder: EncoderConfig, encoder_params, tokenizer_dir) -> Path:
    """The trained params as a model folder (gemb embed / gemb eval read it). Every process
    calls it: each writes its own shards of the params, process 0 the config and tokenizer."""
    from gemb.checkpoints import model_dir as model_dir_lib

    out = paths.as_path(out)
    if distributed.is_chief() and out.exists():
        paths.rmtree(out)
    distributed.sync_processes(f"export {out}: old folder removed")
    model_dir_lib.save_model_dir(out, encoder, encoder_params, {"source": "gemb train"})
    if distributed.is_chief():
        model_dir_lib.copy_tokenizer(tokenizer_dir, out)
        print(f"Exported the trained model to {out}", flush=True)
    distributed.sync_processes(f"export {out}: tokenizer copied")
    return out


def _markdown(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def default_partitioner() -> Partitioner:
    from gemb.partitioning import mesh as mesh_lib

    return Partitioner(mesh_lib.create_mesh())
