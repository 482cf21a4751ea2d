"""Checkpoints of a run (orbax CheckpointManager) and params-only initialisation.

Resume and initialisation are different things (docs/design.md, convention 6):

* auto-resume: `RunCheckpointer.restore_latest` restores the FULL state (params, optimiser,
  step, rng) and the data iterator's state from MODEL_DIR/checkpoints, newest first.
* init_from: `load_init_params` loads PARAMS ONLY from a converted model folder (gemb convert)
  or from a run's checkpoint, with optional regex renames of parameter paths.

Every saved step holds three items: "state" (the train state as a dict of arrays), "data" (the
batcher's state dict) and "meta" (step, the model config, the loss config, and checksums of
everything else: gemb.train.checksums), so a run folder written for another model is
recognised before anything is restored, and a restore proves that it read what was saved.

What restore does with a step that fails, by the kind of failure (`is_damage`):

* damage (its metadata does not parse, tensorstore reports missing or corrupt data, a checksum
  does not match): the step is moved aside to checkpoints/corrupt/ and the previous one is
  tried. If every step was damaged the run stops with an error naming corrupt/, unless
  allow_fresh_start says starting over is fine.
* anything else (an I/O error, out of memory, a runtime error): re-raised, nothing moved. Those
  are faults of the machine, not of the checkpoint, and a rerun resumes from the same step.

Save errors (disk full, permissions) surface at once, as one line naming the path and its free
space (CheckpointSaveError), instead of one save later under orbax's tracebacks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from gemb import distributed, paths
from gemb.train import checksums
from gemb.train.state import TrainState

log = logging.getLogger(__name__)

CHECKPOINTS_DIRNAME = "checkpoints"
CORRUPT_DIRNAME = "corrupt"


class CheckpointDamaged(ValueError):
    """A checkpoint's bytes are not what was saved (checksum mismatch, missing record)."""


class CheckpointRestoreError(RuntimeError):
    """A run's checkpoints exist but the run cannot continue from any of them."""


class RunWriteError(RuntimeError):
    """A file of the run directory could not be written (disk full, no permission, ...)."""


class CheckpointSaveError(RunWriteError):
    """A checkpoint could not be written."""


# tensorstore reports errors as "CODE: message" (absl status codes). These mean the stored
# bytes are missing or wrong; the others (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED,
# PERMISSION_DENIED, UNKNOWN, INTERNAL, ...) are about the machine or the storage service.
_DAMAGE_STATUS_CODES = frozenset(
    {"DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION", "INVALID_ARGUMENT"})
_STATUS_CODE = re.compile(r"^([A-Z][A-Z_]+): ")
# What orbax raises when a whole item folder of a committed step is missing.
_MISSING_ITEM = re.compile(r"Item .* was not found in the checkpoint")


def _error_chain(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def is_damage(error: BaseException) -> bool:
    """True when `error` (from restoring a step) says the checkpoint itself is damaged.

    A fault of the machine anywhere in the chain (an OSError other than a missing file, out of
    memory, a storage status such as UNAVAILABLE) wins: then the checkpoint may be fine.
    """
    chain = _error_chain(error)
    for link in chain:
        if isinstance(link, (FileNotFoundError, NotADirectoryError)):
            continue
        if isinstance(link, (OSError, MemoryError)):
            return False
        match = _STATUS_CODE.match(str(link))
        if match and match.group(1) not in _DAMAGE_STATUS_CODES:
            return False
    for link in chain:
        if isinstance(link, (CheckpointDamaged, json.JSONDecodeError, UnicodeDecodeError,
                             FileNotFoundError, NotADirectoryError)):
            return True
        if isinstance(link, KeyError) and _MISSING_ITEM.search(str(link)):
            return True
        match = _STATUS_CODE.match(str(link))
        if match and match.group(1) in _DAMAGE_STATUS_CODES:
            return True
    return False


def _short(error: BaseException, limit: int = 300) -> str:
    """The most telling message of an error chain (tensorstore's own status line if any)."""
    chain = _error_chain(error)
    for link in chain:
        if _STATUS_CODE.match(str(link)) or isinstance(link, OSError):
            error = link
            break
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def free_space(path: Path) -> str:
    """'1.2 GiB free' on the filesystem of `path` (or of its nearest existing parent)."""
    if paths.is_remote(path):
        return "remote storage"
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "free space unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.1f} {unit} free" if unit != "B" else f"{free} B free"
        free /= 1024
    return "free space unknown"


def describe_write_failure(action: str, where: Path, error: BaseException, note: str) -> str:
    """One line for a failed write: what, where, the OS's reason, the free space, what next."""
    chain = _error_chain(error)
    codes = [link.errno for link in chain if isinstance(link, OSError) and link.errno]
    codes += [int(m) for link in chain for m in re.findall(r"os_error_code='(\d+)'", str(link))]
    reason = (f"{os.strerror(codes[0])} ({errno.errorcode.get(codes[0], codes[0])})" if codes
              else _short(error, 200))
    full = bool({errno.ENOSPC, errno.EDQUOT} & set(codes))
    hint = "Free some space or point MODEL_DIR at a larger disk" if full else "Fix the cause"
    return f"cannot {action} at {where}: {reason}; {free_space(where)} there. {hint}; {note}."


class _OrbaxSaveErrorFilter(logging.Filter):
    """Drops orbax's tracebacks of a failed background save (one per thread, hundreds of lines):
    RunCheckpointer re-raises that failure itself as one CheckpointSaveError line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.exc_info
                    and f"{os.sep}orbax{os.sep}" in record.pathname)


_ORBAX_FILTER = _OrbaxSaveErrorFilter()


def _mute_closed_loop_callbacks() -> None:
    """After a failed save, tensorstore still completes the writes that were in flight and
    calls, from its own native threads, `call_soon_threadsafe` on the asyncio loop of orbax's
    save thread, which has closed by then. Each call raises "Event loop is closed", and
    tensorstore prints it with a traceback straight to stderr (not through sys.excepthook):
    dozens of tracebacks that echo the one failure RunCheckpointer reports. Only such calls
    are dropped: on a closed loop, with a callback that is a pybind11 (native) function; any
    other call raises as before."""
    loop_class = asyncio.BaseEventLoop
    original = loop_class.call_soon_threadsafe
    if getattr(original, "_gemb_drops_native_calls_on_closed_loops", False):
        return

    def call_soon_threadsafe(self, callback, *args, **kwargs):
        if (self.is_closed() and type(getattr(callback, "__self__", None)).__module__
                == "pybind11_builtins"):
            return None  # a native library's callback: nobody could handle the error
        return original(self, callback, *args, **kwargs)

    call_soon_threadsafe._gemb_drops_native_calls_on_closed_loops = True
    loop_class.call_soon_threadsafe = call_soon_threadsafe


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When and what to keep.

    Attributes:
      save_every: save every N steps (and always at the last step).
      keep: the newest N checkpoints are kept.
      keep_best: also keep the best N checkpoints by `best_metric` (0: off); the metric comes
        from the eval hook of the same step.
      best_metric, best_mode: the eval metric that ranks checkpoints, and 'max' or 'min'.
      async_save: write in the background while training goes on.
    """

    save_every: int = 1000
    keep: int = 3
    keep_best: int = 0
    best_metric: str | None = None
    best_mode: str = "max"
    async_save: bool = True

    def __post_init__(self):
        if self.save_every < 1 or self.keep < 1:
            raise ValueError(f"CheckpointConfig.save_every and keep must be >= 1, got "
                             f"{self.save_every} and {self.keep}.")
        if self.keep_best and not self.best_metric:
            raise ValueError("CheckpointConfig.keep_best needs best_metric (an eval metric name).")
        if self.best_mode not in ("max", "min"):
            raise ValueError(f"CheckpointConfig.best_mode={self.best_mode!r}; use 'max' or 'min'.")


class RunCheckpointer:
    """Saves and restores one run's checkpoints under MODEL_DIR/checkpoints."""

    def __init__(self, model_dir: str | Path, config: CheckpointConfig = CheckpointConfig()):
        self.model_dir = paths.absolute(model_dir)
        self.directory = self.model_dir / CHECKPOINTS_DIRNAME
        self.config = config
        self._pending_step: int | None = None  # an async save not yet known to have finished
        self._failed = False
        self._closed = False
        _mute_closed_loop_callbacks()
        if not any(f is _ORBAX_FILTER for f in logging.getLogger("absl").filters):
            from gemb import quiet_imports

            if not quiet_imports.verbose():
                logging.getLogger("absl").addFilter(_ORBAX_FILTER)
        self._manager = self._make_manager()

    def _make_manager(self) -> ocp.CheckpointManager:
        config = self.config
        policies = [pp.LatestN(n=config.keep)]
        if config.keep_best:
            metric = config.best_metric
            policies.append(pp.BestN(get_metric_fn=lambda m: float(m[metric]),
                                     reverse=config.best_mode == "min", n=config.keep_best,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            enable_async_checkpointing=config.async_save,
            create=True, cleanup_tmp_directories=True)
        try:
            return ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "meta"))
        except OSError as error:
            raise CheckpointSaveError(self._save_failure("open", None, error)) from error

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def read_meta(self, step: int) -> dict[str, Any]:
        """The meta record of a step, its own digest verified (CheckpointDamaged if not)."""
        path = self.directory / str(step) / "meta" / "metadata"
        return verified_meta(json.loads(path.read_text()), path)

    # ------------------------------------------------------------------------------- saving

    def resume_note(self) -> str:
        """What a rerun would do now: 'a rerun resumes from step N' or that none exists."""
        try:
            steps = self.all_steps()
        except Exception:  # pylint: disable=broad-except
            steps = []
        return (f"a rerun resumes from step {steps[-1]}" if steps
                else "no checkpoint of this run exists yet")

    def _save_failure(self, what: str, step: int | None, error: BaseException) -> str:
        where = self.directory if step is None else self.directory / str(step)
        if step is not None:
            # The failed step may be listed already; the note is about the ones before it.
            steps = [s for s in self.all_steps() if s < step]
            note = (f"a rerun resumes from step {steps[-1]}" if steps
                    else "no checkpoint of this run exists yet")
        else:
            note = self.resume_note()
        label = "checkpoint" if step is None else f"checkpoint step {step}"
        return describe_write_failure(f"{what} {label}", where, error, note)

    def save(self, step: int, state: TrainState, data_state: Mapping[str, int],
             meta: Mapping[str, Any], metrics: Mapping[str, float] | None = None,
             force: bool = False) -> bool:
        """Starts saving `step` (in the background with async_save). Raises CheckpointSaveError
        at once when this or an earlier save failed."""
        self.check_for_errors()
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        tree = state.to_tree()
        data_state = {k: int(v) for k, v in data_state.items()}
        record = dict(meta, step=int(step),
                      checksums={"state": checksums.tree_checksums(tree),
                                 "data": checksums.record_digest(data_state)})
        record["meta_digest"] = checksums.record_digest(record)
        try:
            started = self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(tree),
                    data=ocp.args.JsonSave(data_state),
                    meta=ocp.args.JsonSave(record)),
                metrics=metrics, force=force)
        except Exception as error:
            self._failed = True
            raise CheckpointSaveError(self._save_failure("save", step, error)) from error
        if started and self.config.async_save:
            self._pending_step = step
        return started

    def check_for_errors(self) -> None:
        """Raises CheckpointSaveError if a background save has failed (cheap: call every step)."""
        if self._pending_step is None or self._manager.is_saving_in_progress():
            return
        self.wait()

    def wait(self) -> None:
        step, self._pending_step = self._pending_step, None
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            self._failed = True
            raise CheckpointSaveError(self._save_failure("save", step, error)) from error

    def close(self, quiet: bool = False) -> None:
        """Waits for the last save; a save failure not yet reported is raised here (or only
        logged, with quiet=True: when another error is already on its way out)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        except CheckpointSaveError as error:
            if not quiet:
                raise
            log.debug("%s", error)
        finally:
            try:
                self._manager.close()
            except Exception:  # pylint: disable=broad-except
                if not (self._failed or quiet):  # a reported failure needs no second report
                    raise

    # ----------------------------------------------------------------------------- restoring

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict, dict]:
        """Restores one step and checks it against the checksums in its meta record."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state.to_tree()),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        meta = verified_meta(dict(restored["meta"]), self.directory / str(step) / "meta")
        data_state = dict(restored["data"])
        verify_restored(restored["state"], data_state, meta, self.directory / str(step))
        return TrainState.from_tree(restored["state"]), data_state, meta

    def restore_latest(self, abstract_state: TrainState, expected_meta: Mapping[str, Any] | None = None,
                       allow_fresh_start: bool = False) -> tuple[TrainState, dict, dict] | None:
        """The newest step that restores cleanly, or None when the run has no checkpoint.

        A damaged step is moved to checkpoints/corrupt/ with a message, and the previous one
        is tried; any other failure is re-raised as CheckpointRestoreError with nothing moved.
        If steps existed and all were damaged: CheckpointRestoreError, unless
        allow_fresh_start. A checkpoint of another model (expected_meta["model"]) is an error.
        """
        steps = self.all_steps()
        moved = []
        for step in reversed(steps):
            result, failure = None, None
            try:
                meta = self.read_meta(step)
            except Exception as error:  # pylint: disable=broad-except
                failure = ("its meta record cannot be read", error)
            else:
                if expected_meta is not None:
                    check_same_model(meta, expected_meta, self.directory / str(step))
                try:
                    result = self.restore(step, abstract_state)
                except Exception as error:  # pylint: disable=broad-except
                    failure = ("its arrays cannot be restored", error)
            if self._agree_on_failure(step, failure):
                moved.append(step)
                continue
            if moved:
                self._manager = self._make_manager()
            return result
        if moved:
            self._manager = self._make_manager()
            corrupt = self.directory / CORRUPT_DIRNAME
            if not allow_fresh_start:
                raise CheckpointRestoreError(
                    f"{self.model_dir} had {len(moved)} checkpoint(s) (steps {sorted(moved)}) and "
                    f"none could be restored: all were damaged and moved to {corrupt}/ (see the "
                    "warnings above). Nothing was trained over them. Inspect or delete them; to "
                    "start this run from scratch anyway, rerun with "
                    "--gin.train.allow_fresh_start=True.")
            print(f"WARNING: every checkpoint of {self.model_dir} was damaged (moved to "
                  f"{corrupt}/); starting from scratch because allow_fresh_start=True.", flush=True)
        return None

    def _agree_on_failure(self, step: int, failure: tuple[str, BaseException] | None) -> bool:
        """Whether `step` is damaged, decided by every process together (each read only its
        own shards, so one may see damage the others do not): any process's non-damage fault
        stops all of them with nothing moved; any damage quarantines the step, once."""
        kind = 0 if failure is None else 1 if is_damage(failure[1]) else 2
        worst = distributed.worst_across_processes(kind)
        if worst == 2:
            what, error = failure if kind == 2 else ("another process could not restore it", None)
            raise CheckpointRestoreError(
                f"restoring checkpoint step {step} of {self.directory} failed: {what} "
                f"({_short(error) if error else 'see its output'}). That is not damage of the "
                "checkpoint (an I/O, memory or runtime error), so nothing was moved; fix the "
                f"cause and rerun to resume from step {step}.") from error
        if worst == 1:
            what, error = failure or ("another process found it damaged", None)
            self._quarantine(step, f"{what}: {_short(error)}" if error else what)
            return True
        return False

    def _quarantine(self, step: int, reason: str) -> None:
        """Moves a damaged step aside: process 0 moves it, every process waits for that."""
        target = self.directory / CORRUPT_DIRNAME / f"{step}.{int(time.time())}"
        if distributed.is_chief():
            target.parent.mkdir(parents=True, exist_ok=True)
            _move_folder(self.directory / str(step), target)
        distributed.sync_processes(f"checkpoint step {step} quarantined")
        message = (f"checkpoint step {step} in {self.directory} is damaged ({reason}); moved it "
                   f"to {target.parent}/ and trying the previous checkpoint.")
        print(f"WARNING: {message}", flush=True)


def verified_meta(meta: Mapping[str, Any], where: Path) -> dict[str, Any]:
    """`meta` after checking its own digest (records written before checksums pass as they are)."""
    meta = dict(meta)
    digest = meta.pop("meta_digest", None)
    if digest is not None and checksums.record_digest(meta) != digest:
        raise CheckpointDamaged(f"{where}: the meta record does not match its digest.")
    return meta


def verify_restored(state_tree: Any, data_state: Mapping[str, Any] | None,
                    meta: Mapping[str, Any], where: Path, prefix: str = "",
                    partial: bool = False) -> None:
    """Checks restored arrays (all of them, or the subtree under `prefix`; with `partial`, just
    the ones read) and the data state against the checksums saved in `meta`;
    CheckpointDamaged names what differs."""
    saved = meta.get("checksums")
    if saved is None:
        log.warning("%s was written without checksums (an older gemb); restored unverified.", where)
        return
    expected = {name: value for name, value in saved["state"].items()
                if name.startswith(prefix)}
    actual = {prefix + name: value for name, value in checksums.tree_checksums(state_tree).items()}
    if partial:
        expected = {name: value for name, value in expected.items() if name in actual}
    problems = checksums.mismatches(expected, actual)
    if data_state is not None and checksums.record_digest(dict(data_state)) != saved["data"]:
        problems.append("data: the data iterator's state does not match its digest")
    if problems:
        raise CheckpointDamaged(f"{where}: {len(problems)} checksum mismatch(es), e.g. "
                                f"{problems[:3]}: the checkpoint's bytes are not what was saved.")


# Transformer fields that change memory use or compute precision but not the saved state: a
# run may resume with other values (e.g. a remat policy that fits a smaller accelerator).
RESUMABLE_CHANGES = ("remat_policy", "dtype", "max_length")


def _state_shaping(model: Mapping[str, Any] | None) -> dict[str, Any]:
    model = json.loads(json.dumps(model or {}))
    for field in RESUMABLE_CHANGES:
        model.get("transformer", {}).pop(field, None)
    return model


def check_same_model(saved: Mapping[str, Any], expected: Mapping[str, Any], where: Path
                     ) -> list[str]:
    """Raises when `saved` (a checkpoint's meta) is of another model than `expected`; returns
    the changes of RESUMABLE_CHANGES fields, which are allowed."""
    old = saved.get("model", {}) or {}
    new = expected.get("model", {}) or {}
    if _state_shaping(old) != _state_shaping(new):
        differ = differences(_state_shaping(old), _state_shaping(new))
        raise ValueError(
            f"{where} holds a checkpoint of another model (differences: {differ[:6]}). Use a new "
            "MODEL_DIR for this model, or delete the old run folder to start over.")
    return differences(old, new)


def differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """["transformer.num_layers: 18 -> 26", ...]: the leaves where nested dicts a and b differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


# ----------------------------------------------------------------------------- init_from


def relayout_layers(tree: Any, source_config, target_config) -> Any:
    """Re-stacks the transformer layers when source and target differ in scan_layers."""
    if target_config is None:
        return tree
    src, dst = source_config.transformer, target_config.transformer
    if src.scan_layers == dst.scan_layers or "transformer" not in tree:
        return tree
    from gemb.checkpoints import layout

    upstream = layout.to_upstream_layout(tree["transformer"], src)
    return dict(tree, transformer=layout.to_model_layout(upstream, dst))


def apply_renames(flat: Mapping[str, Any], renames: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Rewrites "a/b/c" keys with (regex, replacement) pairs, applied in order (re.sub)."""
    out = {}
    for key, value in flat.items():
        new = key
        for pattern, replacement in renames:
            new = re.sub(pattern, replacement, new)
        if new in out:
            raise ValueError(f"init_from renames map two parameters onto {new!r}; make the "
                             "rename patterns more specific.")
        out[new] = value
    return out


def open_run_step(source: str | Path, step: int | None = None
                  ) -> tuple[ocp.CheckpointManager, int]:
    """A read-only manager of a run directory (or its checkpoints/ folder) and the step to read:
    `step`, or the newest; a missing step is an error listing the ones there are."""
    source = paths.absolute(source)
    ckpt_dir = source if source.name == CHECKPOINTS_DIRNAME else source / CHECKPOINTS_DIRNAME
    manager = ocp.CheckpointManager(ckpt_dir, item_names=("state", "data", "meta"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    available = sorted(manager.all_steps())
    if not available:
        raise FileNotFoundError(f"{str(source)!r}: no checkpoint in {ckpt_dir}.")
    if step is None:
        return manager, available[-1]
    if step not in available:
        raise FileNotFoundError(f"{str(source)!r} has no checkpoint of step {step}; it has "
                                f"steps {available}.")
    return manager, step


def read_run_meta(source: str | Path, step: int | None = None) -> dict[str, Any]:
    """The meta record (step, model config, ...) of a run's checkpoint, without its arrays."""
    manager, step = open_run_step(source, step)
    try:
        meta = dict(manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"])
        return verified_meta(meta, manager.directory / str(step) / "meta")
    except Exception as error:
        raise ValueError(f"{str(source)!r}: cannot read the meta record of step {step} "
                         f"({type(error).__name__}: {error}); the checkpoint is incomplete or "
                         "damaged.") from error


def load_init_params(source: str | Path, abstract_encoder_params: Any,
                     renames: Sequence[tuple[str, str]] = (), target_config=None,
                     step: int | None = None) -> Any:
    """Encoder params from a converted model folder or a run directory, placed like
    `abstract_encoder_params` (ShapeDtypeStructs with shardings). From a run directory, `step`
    picks the checkpoint (default: the newest).

    Only the params this model uses are read (no optimiser state), each straight into its
    sharding: every process reads just the shards its devices hold, so no host ever holds the
    whole tree (a 27B model in fp32 is ~108 GB). The one exception is a model folder whose
    layer stacking (scan_layers) differs from this model's: re-stacking happens in host memory.

    `renames` rewrite the SOURCE's parameter paths ("transformer/embedder/input_embedding")
    before matching them to this model's.
    """
    from gemb.checkpoints import model_dir as model_dir_lib

    source = paths.absolute(source)
    where = f"init_from={str(source)!r}"
    if not source.exists():
        raise FileNotFoundError(
            f"{where} does not exist. Give a model folder written by "
            "`gemb convert --from ... --out DIR`, or a training run directory.")
    wanted = {"/".join(k): v for k, v in
              traverse_util.flatten_dict(abstract_encoder_params).items()}
    if (source / model_dir_lib.CONFIG_FILENAME).is_file():
        if step is not None:
            raise ValueError(f"{str(source)!r} is a model folder: it holds one set of params, "
                             f"not steps; drop the step ({step}).")
        params_dir = source / model_dir_lib.PARAMS_DIRNAME
        source_config, _ = model_dir_lib.read_model_config(source)
        if (target_config is not None and source_config.transformer.scan_layers
                != target_config.transformer.scan_layers):
            return _load_relayout(source, params_dir, source_config, target_config, wanted,
                                  renames)
        checkpointer = ocp.PyTreeCheckpointer()

        def saved_metadata():
            return checkpointer.metadata(params_dir).item_metadata.tree

        def restore(target):
            return checkpointer.restore(params_dir, args=_partial_restore_args(target))
    elif (source / CHECKPOINTS_DIRNAME).is_dir() or source.name == CHECKPOINTS_DIRNAME:
        manager, step = open_run_step(source, step)
        step_dir = manager.directory / str(step)

        def saved_metadata():
            tree = ocp.PyTreeCheckpointer().metadata(step_dir / "state").item_metadata.tree
            return tree["params"]["encoder"]

        def restore(target):
            restored = manager.restore(step, args=ocp.args.Composite(
                state=_partial_restore_args({"params": {"encoder": target}}),
                meta=ocp.args.JsonRestore()))
            meta = verified_meta(dict(restored["meta"]), step_dir / "meta")
            params = restored["state"]["params"]["encoder"]
            verify_restored(params, None, meta, step_dir, prefix="params/encoder/",
                            partial=True)
            return params
    else:
        raise FileNotFoundError(
            f"{where} is neither a gemb model folder (no {model_dir_lib.CONFIG_FILENAME}) nor "
            f"a run directory (no {CHECKPOINTS_DIRNAME}/).")
    try:
        saved = {"/".join(k): v for k, v in
                 traverse_util.flatten_dict(saved_metadata()).items()}
    except Exception as error:
        raise ValueError(f"{where}: cannot read its parameters' metadata "
                         f"({type(error).__name__}: {error}).") from error
    source_of = _match_params(where, saved, wanted, renames)
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # specs without one
    # Read in the saved dtype (the checksums are of the saved bytes), cast on the devices.
    target = traverse_util.unflatten_dict({
        tuple(source_of[name].split("/")): jax.ShapeDtypeStruct(
            spec.shape, saved[source_of[name]].dtype, sharding=spec.sharding or local)
        for name, spec in wanted.items()})
    try:
        tree = restore(target)
    except CheckpointDamaged:
        raise
    except Exception as error:
        raise ValueError(f"{where}: cannot read its parameters "
                         f"({type(error).__name__}: {error}).") from error
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}
    out = {name: _cast(flat[source_of[name]], spec) for name, spec in wanted.items()}
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


def _partial_restore_args(target: Any) -> ocp.args.PyTreeRestore:
    """Restore exactly `target`'s leaves (ShapeDtypeStructs with shardings), nothing else."""
    return ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)


def _cast(value: jax.Array, spec: jax.ShapeDtypeStruct) -> jax.Array:
    if value.dtype == spec.dtype:
        return value
    return jax.jit(lambda x: x.astype(spec.dtype), out_shardings=spec.sharding or value.sharding)(value)


def _match_params(where: str, saved: Mapping[str, Any], wanted: Mapping[str, Any],
                  renames: Sequence[tuple[str, str]]) -> dict[str, str]:
    """{this model's param name: the source's name} after `renames`; shapes checked."""
    renamed = apply_renames({name: name for name in saved}, renames)  # new name -> saved name
    missing = sorted(set(wanted) - set(renamed))
    if missing:
        raise ValueError(
            f"{where} lacks parameters this model needs: {missing[:5]} ({len(missing)} in "
            f"all); it has e.g. {sorted(renamed)[:5]}. Use init_renames to map names, or check "
            "that the model config matches the checkpoint.")
    unused = sorted(set(renamed) - set(wanted))
    if unused:
        log.warning("init_from: %d source parameters are not used by this model, e.g. %s",
                    len(unused), unused[:5])
    for name, spec in wanted.items():
        shape = tuple(saved[renamed[name]].shape)
        if shape != tuple(spec.shape):
            raise ValueError(
                f"{where}: parameter {name} has shape {shape} but this model needs "
                f"{tuple(spec.shape)}; the checkpoint belongs to another model size or head.")
    return {name: renamed[name] for name in wanted}


def place_host_array(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array every process holds whole -> a global array: each process copies just its
    devices' shards (jax.device_put would first compare the whole array across processes)."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _load_relayout(source: Path, params_dir: Path, source_config, target_config,
                   wanted: Mapping[str, Any], renames) -> Any:
    """A model folder stacked otherwise than this model (scan_layers): read whole, re-stack on
    the host, then place."""
    where = f"init_from={str(source)!r}"
    log.warning("%s: its layers are stacked otherwise (scan_layers) than this model's; "
                "re-stacking them in host memory (the whole tree).", where)
    try:
        tree = relayout_layers(ocp.StandardCheckpointer().restore(params_dir), source_config,
                               target_config)
    except Exception as error:
        raise ValueError(f"{where}: cannot read its parameters "
                         f"({type(error).__name__}: {error}).") from error
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}
    source_of = _match_params(where, flat, wanted, renames)
    out = {name: place_host_array(np.asarray(flat[source_of[name]], dtype=spec.dtype),
                                  spec.sharding) for name, spec in wanted.items()}
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


def _move_folder(source, target) -> None:
    """Moves a folder: a rename on a local disk; on object storage (no folders to rename) a
    copy of every object, then the source's removal."""
    if not paths.is_remote(source):
        shutil.move(str(source), str(target))
        return
    for file in paths.files_under(source):
        (target / file.relative_to(source)).write_bytes(file.read_bytes())
    paths.rmtree(source)
