"""Checkpoints of a run (orbax CheckpointManager) and params-only initialisation.

Resume and initialisation are different things (DESIGN.md convention 6):

* auto-resume: `RunCheckpointer.restore_latest` restores the FULL state (params, optimiser,
  step, rng) and the data iterator's state from MODEL_DIR/checkpoints, newest first. A step
  that cannot be restored (a half-written or damaged checkpoint) is reported, moved aside to
  MODEL_DIR/checkpoints/corrupt/, and the previous step is used.
* init_from: `load_init_params` loads PARAMS ONLY from a converted model folder (gemb convert)
  or from a run's checkpoint, with optional regex renames of parameter paths.

Every saved step holds three items: "state" (the train state as a dict of arrays), "data" (the
batcher's state dict) and "meta" (step, the model config, the loss config), so a run folder
written for another model is recognised before anything is restored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
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

from gemb.train.state import TrainState

log = logging.getLogger(__name__)

CHECKPOINTS_DIRNAME = "checkpoints"
CORRUPT_DIRNAME = "corrupt"


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
        self.model_dir = Path(model_dir).absolute()
        self.directory = self.model_dir / CHECKPOINTS_DIRNAME
        self.config = config
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
        return ocp.CheckpointManager(self.directory, options=options,
                                     item_names=("state", "data", "meta"))

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def read_meta(self, step: int) -> dict[str, Any]:
        path = self.directory / str(step) / "meta" / "metadata"
        return json.loads(path.read_text())

    def save(self, step: int, state: TrainState, data_state: Mapping[str, int],
             meta: Mapping[str, Any], metrics: Mapping[str, float] | None = None,
             force: bool = False) -> bool:
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state.to_tree()),
                data=ocp.args.JsonSave({k: int(v) for k, v in data_state.items()}),
                meta=ocp.args.JsonSave(dict(meta, step=int(step)))),
            metrics=metrics, force=force)

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict, dict]:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state.to_tree()),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        state = TrainState.from_tree(restored["state"])
        return state, dict(restored["data"]), dict(restored["meta"])

    def restore_latest(self, abstract_state: TrainState, expected_meta: Mapping[str, Any] | None = None
                       ) -> tuple[TrainState, dict, dict] | None:
        """The newest step that restores cleanly, or None when the run has no checkpoint.

        A damaged step is moved to checkpoints/corrupt/ with a message, and the previous one
        is tried. A checkpoint of another model (expected_meta["model"] differs) is an error.
        """
        steps = self.all_steps()
        moved = False
        for step in reversed(steps):
            try:
                meta = self.read_meta(step)
            except (OSError, ValueError) as error:
                self._quarantine(step, f"its metadata cannot be read ({error})")
                moved = True
                continue
            if expected_meta is not None:
                check_same_model(meta, expected_meta, self.directory / str(step))
            try:
                result = self.restore(step, abstract_state)
            except Exception as error:  # orbax raises many types for damaged files
                self._quarantine(step, f"{type(error).__name__}: {str(error)[:300]}")
                moved = True
                continue
            if moved:
                self._manager = self._make_manager()
            return result
        if moved:
            self._manager = self._make_manager()
        return None

    def _quarantine(self, step: int, reason: str) -> None:
        target = self.directory / CORRUPT_DIRNAME / f"{step}.{int(time.time())}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.directory / str(step)), str(target))
        message = (f"checkpoint step {step} in {self.directory} cannot be restored ({reason}); "
                   f"moved it to {target} and trying the previous checkpoint.")
        log.warning(message)
        print(f"WARNING: {message}", flush=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def check_same_model(saved: Mapping[str, Any], expected: Mapping[str, Any], where: Path) -> None:
    if saved.get("model") != expected.get("model"):
        old = saved.get("model", {}) or {}
        new = expected.get("model", {}) or {}
        differ = differences(old, new)
        raise ValueError(
            f"{where} holds a checkpoint of another model (differences: {differ[:6]}). Use a new "
            "MODEL_DIR for this model, or delete the old run folder to start over.")


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
    source = Path(source)
    ckpt_dir = source if source.name == CHECKPOINTS_DIRNAME else source / CHECKPOINTS_DIRNAME
    manager = ocp.CheckpointManager(ckpt_dir.absolute(), item_names=("state", "data", "meta"),
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
        return dict(manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"])
    except Exception as error:
        raise ValueError(f"{str(source)!r}: cannot read the meta record of step {step} "
                         f"({type(error).__name__}: {error}); the checkpoint is incomplete or "
                         "damaged.") from error


def load_init_params(source: str | Path, abstract_encoder_params: Any,
                     renames: Sequence[tuple[str, str]] = (), target_config=None,
                     step: int | None = None) -> Any:
    """Encoder params from a converted model folder or a run directory, placed like
    `abstract_encoder_params` (ShapeDtypeStructs with shardings). Only params are read.
    From a run directory, `step` picks the checkpoint (default: the newest).

    `renames` rewrite the SOURCE's parameter paths ("transformer/embedder/input_embedding")
    before matching them to this model's.
    """
    from gemb.checkpoints import model_dir as model_dir_lib

    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(
            f"init_from={str(source)!r} does not exist. Give a model folder written by "
            "`gemb convert --from ... --out DIR`, or a training run directory.")
    if (source / model_dir_lib.CONFIG_FILENAME).is_file():
        if step is not None:
            raise ValueError(f"{str(source)!r} is a model folder: it holds one set of params, "
                             f"not steps; drop the step ({step}).")
        params_dir = source / model_dir_lib.PARAMS_DIRNAME
        source_config, _ = model_dir_lib.read_model_config(source)

        def read_tree():
            tree = ocp.StandardCheckpointer().restore(params_dir.absolute())
            return relayout_layers(tree, source_config, target_config)
    elif (source / CHECKPOINTS_DIRNAME).is_dir() or source.name == CHECKPOINTS_DIRNAME:
        manager, step = open_run_step(source, step)

        def read_tree():
            state = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore()))["state"]
            return state["params"]["encoder"]
    else:
        raise FileNotFoundError(
            f"init_from={str(source)!r} is neither a gemb model folder (no "
            f"{model_dir_lib.CONFIG_FILENAME}) nor a run directory (no {CHECKPOINTS_DIRNAME}/).")
    try:
        tree = read_tree()
    except Exception as error:
        raise ValueError(f"init_from={str(source)!r}: cannot read its parameters "
                         f"({type(error).__name__}: {error}).") from error
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}
    flat = apply_renames(flat, renames)
    wanted = {"/".join(k): v for k, v in traverse_util.flatten_dict(abstract_encoder_params).items()}
    missing = sorted(set(wanted) - set(flat))
    if missing:
        raise ValueError(
            f"init_from={str(source)!r} lacks parameters this model needs: {missing[:5]} "
            f"({len(missing)} in all); it has e.g. {sorted(flat)[:5]}. Use init_renames to map "
            "names, or check that the model config matches the checkpoint.")
    unused = sorted(set(flat) - set(wanted))
    if unused:
        log.warning("init_from: %d source parameters are not used by this model, e.g. %s",
                    len(unused), unused[:5])
    out = {}
    for name, spec in wanted.items():
        value = flat[name]
        if tuple(value.shape) != tuple(spec.shape):
            raise ValueError(
                f"init_from={str(source)!r}: parameter {name} has shape {tuple(value.shape)} but "
                f"this model needs {tuple(spec.shape)}; the checkpoint belongs to another model "
                "size or head.")
        out[name] = jax.device_put(np.asarray(value, dtype=spec.dtype), spec.sharding)
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})
