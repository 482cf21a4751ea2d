"""`gemb train` (and `python -m gemb.train`): gin-configured training, t5x style.

    gemb train --gin_file=gin/runs/quickstart.gin --gin.MODEL_DIR="'runs/quickstart'"
    gemb train --gin_file=gin/models/gemma3_1b.gin --gin_file=gin/runs/finetune.gin \\
        --gin_file=gin/partitioning/fsdp.gin --gin.MODEL_DIR="'gs://bucket/run'" \\
        --gin.INIT_FROM="'models/gemma3-1b'" --gin.train.num_steps=2000

--gin_file may repeat (later files override earlier ones), --gin.NAME=VALUE binds one value
after all files, --gin_search_path adds folders to look up includes and --gin_file names in
(the repository's gin/ folder is always searched). The run directory is the MODEL_DIR macro;
the operative config is written to MODEL_DIR/config.gin and to TensorBoard.

`train()` is the whole run: build the mesh and check the configuration, restore the newest
checkpoint of MODEL_DIR (or initialise from init_from, or randomly), then loop: next batch ->
jitted step -> log -> eval hook -> checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import gin
import jax
import numpy as np

from gemb import paths
from gemb.losses import ContrastiveLossConfig
from gemb.models.config import EncoderConfig
from gemb.partitioning.partitioner import Partitioner
from gemb.train import checkpointing, metrics_writer, optimizers, trainer
from gemb.train.state import StateLayout

log = logging.getLogger(__name__)

GIN_DIR = paths.REPO_ROOT / "gin"
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


def maybe_initialize_distributed() -> None:
    """jax.distributed.initialize() when launched as one of several processes.

    Detects SLURM (SLURM_NTASKS > 1), TPU VM pods (TPU_WORKER_HOSTNAMES with several hosts),
    an explicit JAX_COORDINATOR_ADDRESS, or GEMB_DISTRIBUTED=1; jax fills in the rest itself.
    """
    env = os.environ
    several = (int(env.get("SLURM_NTASKS", "1")) > 1
               or "," in env.get("TPU_WORKER_HOSTNAMES", "")
               or bool(env.get("JAX_COORDINATOR_ADDRESS"))
               or env.get("GEMB_DISTRIBUTED") == "1")
    if several and not jax.distributed.is_initialized():
        jax.distributed.initialize()
        log.info("jax.distributed: process %d of %d, %d global devices", jax.process_index(),
                 jax.process_count(), jax.device_count())


def _global_batch(batch: Mapping[str, np.ndarray], partitioner: Partitioner) -> dict[str, jax.Array]:
    """Host-local numpy rows -> global jax.Arrays split over the data axes (any host count)."""
    return {k: jax.make_array_from_process_local_data(partitioner.batch_sharding(np.ndim(v)), v)
            for k, v in batch.items()}


class ParamsEncoder:
    """encode(texts, role) with given params: what evaluators call during training."""

    def __init__(self, encoder: EncoderConfig, tokenizer_dir, partitioner: Partitioner,
                 task: Optional[str], max_length: Optional[int], batch_size: int = 32):
        from gemb.embed import TextEncoder
        from gemb.tokenizer import Tokenizer

        self._tokenizer = Tokenizer.from_dir(tokenizer_dir)
        self._make = lambda params: TextEncoder(  # noqa: E731
            encoder, params, self._tokenizer, task=task, max_length=max_length,
            batch_size=batch_size, partitioner=partitioner)
        self._encoder = None

    def bind(self, params) -> Callable:
        if self._encoder is None:
            self._encoder = self._make(params)
        self._encoder.params = params
        return self._encoder.encode


@gin.configurable(denylist=["gin_config_text"])
def train(
    model_dir: str = gin.REQUIRED,
    encoder: EncoderConfig = gin.REQUIRED,
    data: Any = gin.REQUIRED,
    num_steps: int = gin.REQUIRED,
    partitioner: Callable[[], Partitioner] = None,
    optimizer: optimizers.OptimizerConfig = optimizers.OptimizerConfig(),
    loss: ContrastiveLossConfig = ContrastiveLossConfig(),
    step: trainer.StepConfig = trainer.StepConfig(),
    checkpoint: checkpointing.CheckpointConfig = checkpointing.CheckpointConfig(),
    init_from: Optional[str] = None,
    init_renames: Sequence[tuple[str, str]] = (),
    seed: int = 0,
    log_every: int = 10,
    eval_hook: Optional[metrics_writer.EvalHook] = None,
    eval_task: Optional[str] = None,
    eval_max_length: Optional[int] = None,
    tokenizer_dir: Optional[str] = None,
    export: bool = False,
    stop_after: Optional[int] = None,
    allow_fresh_start: bool = False,
    dry_run: bool = False,
    gin_config_text: Optional[str] = None,
) -> dict[str, Any]:
    """Trains (or resumes) the run in model_dir; returns a summary dict.

    Args:
      model_dir: the run directory (MODEL_DIR): checkpoints/, config.gin, TensorBoard files.
      encoder: the model (gin/models/*.gin).
      data: a factory with make(state, num_shards, shard_index) -> resumable iterator
        (gemb.train.data.SeqioData or SyntheticData).
      num_steps: total optimiser steps of the run.
      partitioner: a callable returning the Partitioner (gin/partitioning/*.gin); default:
        data parallelism over every device.
      optimizer, loss, step, checkpoint: see their classes.
      init_from: a converted model folder or a run directory to take the initial PARAMS from
        (ignored when model_dir already has a checkpoint: that is resumed instead).
      init_renames: (regex, replacement) pairs applied to init_from's parameter paths.
      seed: rng seed of the state (random init, the head when not in init_from).
      log_every: console line, TensorBoard scalars and metrics file every N steps.
      eval_hook: evaluators run every N steps (see metrics_writer.EvalHook).
      eval_task, eval_max_length: the prompt task and max tokens of the evaluators' encoder.
      tokenizer_dir: where the evaluators' tokenizer is (default: init_from).
      export: write the final params as a model folder MODEL_DIR/export (gemb embed / eval).
      stop_after: stop this process after this many steps (tests and time-boxed jobs); the run
        continues from its checkpoint next time.
      allow_fresh_start: when model_dir has checkpoints but every one is damaged (moved to
        checkpoints/corrupt/), start over instead of stopping with an error.
      dry_run: build and check everything (mesh, batch, model, optimiser, run folder), then
        return before any parameter is created.
    """
    start_time = time.time()
    model_dir = Path(model_dir)
    is_chief = jax.process_index() == 0
    model_dir.mkdir(parents=True, exist_ok=True)

    # 1. Everything that can be wrong with the configuration fails here, before any compute.
    partitioner = (partitioner or default_partitioner)()
    batch_size = getattr(data, "batch_size", None)
    if batch_size is not None:
        partitioner.check_batch_size(batch_size, "data.batch_size (the global batch)")
        if step.gradient_cache_chunk and batch_size % step.gradient_cache_chunk:
            raise ValueError(f"data.batch_size={batch_size} is not a multiple of "
                             f"step.gradient_cache_chunk={step.gradient_cache_chunk}.")
        if batch_size % step.microbatches:
            raise ValueError(f"data.batch_size={batch_size} is not a multiple of "
                             f"step.microbatches={step.microbatches}.")
        per_micro = batch_size // step.microbatches
        if per_micro % partitioner.data_parallel_size:
            raise ValueError(f"a microbatch of {per_micro} cannot be split over "
                             f"{partitioner.data_parallel_size} data shards.")
    if getattr(data, "pack", False) and (step.gradient_cache_chunk or step.microbatches > 1):
        raise ValueError("packed batches cannot be cut into gradient-cache chunks or microbatches;"
                         " set data.pack=False or drop gradient_cache_chunk / microbatches.")
    if init_from is not None and not Path(init_from).exists():
        raise FileNotFoundError(
            f"init_from={init_from!r} does not exist. Convert a model first (gemb convert --from "
            "gemma3-270m --out DIR) or point INIT_FROM at a run directory.")
    tx, schedule = optimizers.make_optimizer(optimizer, num_steps)
    layout = StateLayout(encoder, loss, tx, optimizer.freeze_patterns, partitioner)
    meta = _model_meta(encoder, loss, optimizer)
    meta["data"] = {"batch_size": batch_size}
    ckpt = checkpointing.RunCheckpointer(model_dir, checkpoint)
    latest = ckpt.latest_step()
    if latest is not None:
        try:
            saved_meta = ckpt.read_meta(latest)
        except Exception:  # pylint: disable=broad-except
            saved_meta = None  # restore_latest below tells damage from other faults
        if saved_meta is not None:
            _check_resumable(saved_meta, meta, ckpt.directory / str(latest))

    if dry_run:
        ckpt.close()
        return {"model_dir": str(model_dir), "final_step": latest or 0, "wall_seconds": 0.0,
                "eval": {}, "stop_reason": "dry_run", "num_params": layout.num_params,
                "num_trainable": layout.num_trainable, "mesh": dict(partitioner.mesh.shape),
                "data": data, "eval_hook": eval_hook}

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
            params = layout.random_params(encoder, loss, seed) if "log_temperature" in layout.abstract_params else {}
            params = dict(params, encoder=encoder_params)
            origin = f"params from {init_from}"
        else:
            params = layout.random_params(encoder, loss, seed)
            origin = f"random params (seed {seed})"
        state = layout.create(params, seed)
        del params
        print(f"Starting {model_dir} from scratch at step 0 with {origin}: it has no checkpoint "
              "to resume.", flush=True)
    print(f"Model {encoder.transformer.name}: {layout.num_params:,} params, "
          f"{layout.num_trainable:,} trainable; mesh {dict(partitioner.mesh.shape)}.", flush=True)

    iterator = data.make(data_state, num_shards=jax.process_count(),
                         shard_index=jax.process_index(),
                         **({"row_multiple": partitioner.data_parallel_size}
                            if hasattr(data, "pack") else {}))
    steps = trainer.CompiledSteps(
        layout, trainer.make_train_step(encoder, loss, tx, schedule, optimizer.freeze_patterns, step))

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
    console = metrics_writer.ConsoleLogger(num_steps, log_every)
    eval_results: dict[int, dict[str, float]] = {}
    params_encoder = None
    if eval_hook is not None and eval_hook.evaluators:
        params_encoder = ParamsEncoder(encoder, tokenizer_dir or init_from, partitioner,
                                       eval_task, eval_max_length)

    def run_eval(at_step: int) -> dict[str, float]:
        results = eval_hook.run(at_step, params_encoder.bind(state.params["encoder"]))
        eval_results[at_step] = results
        print(f"eval step {at_step}: {metrics_writer.format_results(results)}", flush=True)
        if tb:
            with _writing(model_dir / "train", ckpt):
                tb.scalars(at_step, {f"eval/{k}": v for k, v in results.items()})
                tb.flush()
        return results

    first_step = int(state.step)
    if eval_hook is not None and eval_hook.at_start and first_step == 0 and params_encoder:
        run_eval(0)
    console.start(first_step)
    loop_start = time.time()
    last_step = num_steps if stop_after is None else min(num_steps, first_step + stop_after)
    guard = DivergenceGuard(step.nan_policy, step.max_consecutive_nonfinite, ckpt)
    kill_after = _kill_after_step()
    try:
        for current in range(first_step, last_step):
            features = next(iterator)
            batch = trainer.prepare_batch(features, pack=getattr(data, "pack", None))
            console.add_tokens(trainer.batch_tokens(batch) * jax.process_count())
            state, metrics = steps.train(state, _global_batch(batch, partitioner))
            done = current + 1
            finite = bool(metrics["finite"])  # waits for the step to finish
            ckpt.check_for_errors()  # a failed background save stops the run now
            if current == first_step:
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
            results = None
            if finite and eval_hook is not None and params_encoder and eval_hook.due(done, num_steps):
                results = run_eval(done)
                console.start(done)  # evaluation time is not training throughput
            if done % checkpoint.save_every == 0 or done == num_steps or done == last_step:
                if finite:
                    ckpt.save(done, state, iterator.state, meta,
                              metrics=results if checkpoint.keep_best else None,
                              force=done == num_steps or done == last_step)
                else:
                    print(f"step {done}: no checkpoint saved, the step was not finite (the "
                          "last checkpoint keeps the state before it).", flush=True)
            if kill_after == done:
                _kill_self(ckpt, done)
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
    if export and int(state.step) == num_steps and is_chief:
        if not guard.last_step_finite:
            raise TrainingDiverged(f"not exporting {model_dir / 'export'}: the last step "
                                   f"({num_steps}) was not finite.")
        export_model_dir(model_dir / "export", encoder, state.params["encoder"], model_dir)
    summary = {"model_dir": str(model_dir), "final_step": int(state.step), "wall_seconds": time.time() - start_time,
               "eval": eval_results, "stop_reason": None, "skipped_steps": guard.skipped}
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
    import signal

    ckpt.wait()
    print(f"{_KILL_AFTER_STEP_ENV}={step}: killing this process (SIGKILL).", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def export_model_dir(out: Path, encoder: EncoderConfig, encoder_params, tokenizer_dir) -> Path:
    """The trained params as a model folder (gemb embed / gemb eval read it)."""
    from gemb.checkpoints import model_dir as model_dir_lib

    if out.exists():
        shutil.rmtree(out)
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), encoder_params)
    model_dir_lib.save_model_dir(out, encoder, host, {"source": "gemb train"})
    model_dir_lib.copy_tokenizer(tokenizer_dir, out)
    print(f"Exported the trained model to {out}", flush=True)
    return out


def _markdown(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def default_partitioner() -> Partitioner:
    from gemb.partitioning import mesh as mesh_lib

    return Partitioner(mesh_lib.create_mesh())


# ------------------------------------------------------------------------------------- CLI


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
    """t5x-style flags: --gin_file (repeatable), --gin.NAME=VALUE, --gin_search_path."""
    parser = argparse.ArgumentParser(prog="gemb train", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin file (repeatable; relative to the search path or cwd)")
    parser.add_argument("--gin_bindings", action="append", default=[],
                        help="a gin binding, like --gin.NAME=VALUE")
    parser.add_argument("--gin_search_path", action="append", default=[])
    parser.add_argument("--log_level", default="WARNING")
    args, rest = parser.parse_known_args(list(argv))
    bindings = list(args.gin_bindings)
    unknown = []
    for item in rest:
        if item.startswith("--gin."):
            name_value = item[len("--gin."):]
            if "=" not in name_value:
                raise SystemExit(f"gemb train: {item} needs a value: --gin.NAME=VALUE")
            bindings.append(name_value)
        else:
            unknown.append(item)
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    args.bindings = bindings
    return args


def _guard_gin_resource_reader() -> None:
    """gin looks up an include 'models/x.gin' as a file of a Python package `models` first; a
    namespace package of that name (any folder `models/` on sys.path, e.g. tests/models) has no
    origin and gin crashes with a TypeError instead of moving on to the search paths."""
    from gin import resource_reader

    original = resource_reader._parse_config_path  # pylint: disable=protected-access
    if getattr(original, "_gemb_guarded", False):
        return

    def guarded(config_path):
        try:
            return original(config_path)
        except TypeError:
            raise ValueError("Package not found", config_path) from None

    guarded._gemb_guarded = True
    resource_reader._parse_config_path = guarded  # pylint: disable=protected-access


def parse_gin(files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
    from gemb.train import gin_registry

    gin_registry.register()
    _guard_gin_resource_reader()
    for path in [*search_paths, str(GIN_DIR), str(paths.REPO_ROOT), os.getcwd()]:
        gin.add_config_file_search_path(path)
    # gin logs an ERROR for every search path an include is NOT found in; only the final
    # failure matters, and that one raises.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        gin.parse_config_files_and_bindings(list(files), list(bindings), finalize_config=False)
    finally:
        root.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_flags(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.gin_file:
        print("gemb train: give at least one --gin_file (e.g. gin/runs/quickstart.gin)",
              file=sys.stderr)
        return 2
    maybe_initialize_distributed()
    parse_gin(args.gin_file, args.bindings, args.gin_search_path)
    config_text = gin.config_str()
    try:
        result = train(gin_config_text=config_text)  # pylint: disable=no-value-for-parameter
    except (TrainingDiverged, checkpointing.CheckpointRestoreError,
            checkpointing.RunWriteError) as error:
        # gin appends "In call to configurable 'train'" to the message: the first line says it.
        print(f"gemb train: {str(error).splitlines()[0]}", file=sys.stderr, flush=True)
        return 1
    if jax.process_index() == 0:
        # Now every configurable has been called: the operative config is complete.
        Path(result["model_dir"], OPERATIVE_CONFIG).write_text(gin.operative_config_str())
    print(f"Done: step {result['final_step']} in {result['wall_seconds'] / 60:.1f} min.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
