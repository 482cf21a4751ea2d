"""`gemb soup`: a model folder whose params are the (weighted) average of several checkpoints.

The recipe's last stage (docs/recipe.md, "model soup"): average the parameters of fine-tuned
checkpoints of one architecture: one run at different steps, different runs, or weighted.

  gemb soup --model runs/ft_a --model runs/ft_b@3000 --model models/ft_c \\
            [--weights 2,1,1] --out models/soup

An ingredient is a model folder (gemb convert / a run's export) or a run directory, optionally
with @STEP to pick a checkpoint (default: the newest). The average is taken in float32 whatever
the stored dtype, one ingredient at a time (memory: two copies of the params), on the sharded
placement of the partitioner, so a soup of a model that only fits a pod is made on that pod.
The result is a model folder: gemb embed, gemb eval and init_from read it.

Greedy soup (Wortsman et al. 2022, "Model soups"): with --greedy and --eval TASKS, every
ingredient is scored alone on the validation tasks (the mean of their main scores), sorted best
first, and added to the soup only if the soup's score does not drop; the rest are left out.

  gemb soup --greedy --eval 'CoSQA-CoCLR-dev?num_queries=100' --model runs/a --model runs/b \
            --model runs/c --out models/greedy_soup

Each candidate soup is written (to --work_dir, default OUT.candidates) and evaluated as a model
folder; greedy_soup.json in the soup's folder records every score and decision.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import linen as nn

from gemb import distributed, paths
from gemb.checkpoints import model_dir as model_dir_lib
from gemb.models import encoder as encoder_lib
from gemb.models.config import EncoderConfig
from gemb.partitioning import mesh as mesh_lib
from gemb.partitioning import partitioner as partitioner_lib
from gemb.train import checkpointing

log = logging.getLogger(__name__)

# Config fields that change how the model is computed or stored but not what its params mean:
# ingredients may differ in them (a scanned and an unscanned run can be averaged).
_LAYOUT_ONLY_FIELDS = ("scan_layers", "remat_policy", "dtype", "param_dtype", "max_length")


@dataclasses.dataclass(frozen=True)
class Ingredient:
    """One checkpoint of the soup: a model folder or a run directory (at `step`)."""

    source: Path | epath.Path
    step: Optional[int] = None
    weight: float = 1.0

    @classmethod
    def parse(cls, spec: str, weight: float = 1.0) -> "Ingredient":
        """'runs/ft@3000' -> run directory runs/ft at step 3000; 'models/x' -> that folder."""
        match = re.fullmatch(r"(.+)@(\d+)", spec)
        source, step = (match.group(1), int(match.group(2))) if match else (spec, None)
        return cls(paths.as_path(source), step, weight)

    @property
    def label(self) -> str:
        return f"{self.source}@{self.step}" if self.step is not None else str(self.source)

    def is_model_folder(self) -> bool:
        return (self.source / model_dir_lib.CONFIG_FILENAME).is_file()

    def config(self) -> EncoderConfig:
        """The ingredient's EncoderConfig: from gemb_model.json, or from the run's checkpoint."""
        if not self.source.exists():
            raise FileNotFoundError(f"soup ingredient {self.label}: {self.source} does not exist.")
        if self.is_model_folder():
            return model_dir_lib.read_model_config(self.source)[0]
        if not (self.source / checkpointing.CHECKPOINTS_DIRNAME).is_dir():
            raise FileNotFoundError(
                f"soup ingredient {self.label} is neither a model folder (no "
                f"{model_dir_lib.CONFIG_FILENAME}) nor a run directory (no "
                f"{checkpointing.CHECKPOINTS_DIRNAME}/).")
        meta = checkpointing.read_run_meta(self.source, self.step)
        return model_dir_lib.encoder_config_from_dict(meta["model"])


def normalized_weights(ingredients: Sequence[Ingredient]) -> list[float]:
    weights = [float(i.weight) for i in ingredients]
    if any(not np.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"soup weights must be finite and >= 0, got {weights}.")
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"soup weights sum to {total}; give at least one positive weight.")
    return [w / total for w in weights]


def _meaning(config: EncoderConfig) -> dict[str, Any]:
    """The config without the fields that only change layout or compute precision."""
    data = model_dir_lib.encoder_config_to_dict(config)
    for field in _LAYOUT_ONLY_FIELDS:
        data["transformer"].pop(field, None)
    return data


def check_same_architecture(configs: Sequence[tuple[str, EncoderConfig]]) -> None:
    """Raises naming the first ingredient and field that differ from the first ingredient."""
    (first_label, first), *rest = configs
    reference = _meaning(first)
    for label, config in rest:
        other = _meaning(config)
        if other != reference:
            differences = checkpointing.differences(reference, other)
            raise ValueError(
                f"soup ingredients must share one architecture: {label} differs from "
                f"{first_label} in {differences[:5]}. Average only checkpoints of one model.")


def make_soup(ingredients: Sequence[Ingredient], out_dir: str | os.PathLike,
              partitioner: Optional[partitioner_lib.Partitioner] = None,
              tokenizer_from: Optional[str | os.PathLike] = None) -> Path | epath.Path:
    """Writes the weighted parameter average of `ingredients` as a model folder at out_dir."""
    if not ingredients:
        raise ValueError("a soup needs at least one ingredient (--model).")
    out_dir = paths.as_path(out_dir)
    if (out_dir / model_dir_lib.PARAMS_DIRNAME).exists():
        raise FileExistsError(f"{out_dir} already holds a model; choose a new --out folder.")
    weights = normalized_weights(ingredients)
    configs = [(i.label, i.config()) for i in ingredients]
    check_same_architecture(configs)
    target = configs[0][1]

    partitioner = partitioner or partitioner_lib.Partitioner(mesh_lib.create_mesh())
    boxed = encoder_lib.boxed_params(target)
    # Read every ingredient as float32 so the sum does not round in bf16.
    abstract = partitioner.abstract_params(boxed, dtype=jnp.float32)
    dtypes = jax.tree.map(lambda leaf: leaf.dtype, nn.unbox(boxed))

    # Donating the running sum keeps two copies of the params in memory, not three.
    accumulate = jax.jit(lambda total, params, weight: jax.tree.map(
        lambda t, p: t + weight * p, total, params), donate_argnums=(0,))
    total = None
    for index, (ingredient, weight) in enumerate(zip(ingredients, weights)):
        started = time.time()
        params = checkpointing.load_init_params(
            ingredient.source, abstract, target_config=target, step=ingredient.step)
        if total is None:
            total = jax.tree.map(lambda p: p * weight, params)
        else:
            total = accumulate(total, params, jnp.float32(weight))
        del params
        log.info("soup: added %s (weight %.4f) in %.1f s [%d/%d]", ingredient.label, weight,
                 time.time() - started, index + 1, len(ingredients))
    # Cast back on the devices, in place: the soup is written shard by shard (every process
    # its own), never gathered into one host's memory.
    soup = jax.jit(lambda tree: jax.tree.map(lambda p, dtype: p.astype(dtype), tree, dtypes),
                   donate_argnums=0)(total)
    metadata = {"source": "gemb soup", "ingredients": [
        {"source": str(i.source), "step": i.step, "weight": w}
        for i, w in zip(ingredients, weights)]}
    model_dir_lib.save_model_dir(out_dir, target, soup, metadata)
    if distributed.is_chief():
        sources = [tokenizer_from] if tokenizer_from else [i.source for i in ingredients]
        if not any(model_dir_lib.copy_tokenizer(source, out_dir) for source in sources):
            log.warning("soup: no tokenizer file found in %s; copy tokenizer.model into %s "
                        "before gemb embed can read it.", [str(s) for s in sources], out_dir)
    distributed.sync_processes(f"soup {out_dir}: tokenizer copied")
    return out_dir


def greedy_soup(ingredients: Sequence[Ingredient], out_dir: str | os.PathLike,
                score: Callable[[Path | epath.Path], float],
                work_dir: Optional[str | os.PathLike] = None,
                partitioner: Optional[partitioner_lib.Partitioner] = None,
                tokenizer_from: Optional[str | os.PathLike] = None) -> dict:
    """The greedy soup of `ingredients` (module docstring) at out_dir; returns its report.

    score(model folder) -> the validation score, higher is better. Ingredients are scored alone
    (each as a one-ingredient soup), sorted best first (ties keep their order), and each is
    kept only if the uniform soup with it scores at least as well as the soup without it."""
    if not ingredients:
        raise ValueError("a soup needs at least one ingredient (--model).")
    out_dir = paths.as_path(out_dir)
    if (out_dir / model_dir_lib.PARAMS_DIRNAME).exists():
        raise FileExistsError(f"{out_dir} already holds a model; choose a new --out folder.")
    work = paths.as_path(work_dir) if work_dir else out_dir.parent / f"{out_dir.name}.candidates"
    check_same_architecture([(i.label, i.config()) for i in ingredients])
    made = [0]

    def soup_score(members: Sequence[Ingredient]) -> float:
        made[0] += 1
        folder = work / f"candidate_{made[0]:03d}"
        if (folder / model_dir_lib.PARAMS_DIRNAME).exists():  # a rerun's leftover
            epath.Path(str(folder)).rmtree()
        make_soup([dataclasses.replace(m, weight=1.0) for m in members], folder, partitioner,
                  tokenizer_from)
        value = float(score(folder))
        log.info("greedy soup: %s -> %.4f", " + ".join(m.label for m in members), value)
        return value

    alone = [soup_score([ingredient]) for ingredient in ingredients]
    order = sorted(range(len(ingredients)), key=lambda i: -alone[i])
    chosen, best = [ingredients[order[0]]], alone[order[0]]
    decisions = [{"ingredient": ingredients[order[0]].label, "score_alone": alone[order[0]],
                  "soup_score": best, "kept": True}]
    for index in order[1:]:
        candidate = soup_score([*chosen, ingredients[index]])
        kept = candidate >= best
        if kept:
            chosen, best = [*chosen, ingredients[index]], candidate
        decisions.append({"ingredient": ingredients[index].label,
                          "score_alone": alone[index], "soup_score": candidate, "kept": kept})
    make_soup([dataclasses.replace(m, weight=1.0) for m in chosen], out_dir, partitioner,
              tokenizer_from)
    report = {"method": "greedy soup (Wortsman et al. 2022)", "score": best,
              "ingredients": [m.label for m in chosen], "decisions": decisions}
    if distributed.is_chief():
        (out_dir / "greedy_soup.json").write_text(json.dumps(report, indent=2) + "\n")
    distributed.sync_processes(f"greedy soup {out_dir}: report written")
    return report


def eval_score(task_specs: str, max_length: Optional[int] = None) -> Callable[[Any], float]:
    """score(model folder) for greedy_soup: the mean main score of gemb eval task specs."""
    from gemb.embed import load_encoder
    from gemb.eval import tasks as tasks_lib

    tasks = tasks_lib.parse_task_list(task_specs)

    def score(folder) -> float:
        encoder = load_encoder(folder, max_length=max_length)
        return float(np.mean([task.evaluate(encoder)["main_score"] for task in tasks]))

    return score


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemb soup", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", action="append", default=[], required=True,
                        help="an ingredient: a model folder, or a run directory[@STEP]; repeat")
    parser.add_argument("--weights", default=None,
                        help="comma-separated weights, one per --model (default: equal)")
    parser.add_argument("--out", required=True, help="the new model folder")
    parser.add_argument("--tokenizer-from", default=None,
                        help="folder to take tokenizer.model from (default: the first "
                             "ingredient that has one)")
    parser.add_argument("--greedy", action="store_true",
                        help="greedy soup: keep an ingredient only if the --eval score of the "
                             "soup does not drop")
    parser.add_argument("--eval", default=None, metavar="TASKS",
                        help="validation tasks of --greedy (gemb eval specs, comma-separated; "
                             "the mean main score); never the test tasks you report")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per text in --eval (default: gemb embed's)")
    parser.add_argument("--work_dir", default=None,
                        help="where --greedy writes its candidate soups (default: OUT.candidates)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    weights = [1.0] * len(args.model)
    if args.weights is not None:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            print(f"gemb soup: error: --weights {args.weights!r} is not a list of numbers.",
                  file=sys.stderr)
            return 2
        if len(weights) != len(args.model):
            print(f"gemb soup: error: {len(weights)} weights for {len(args.model)} --model "
                  "ingredients; give one weight per ingredient.", file=sys.stderr)
            return 2
    if args.greedy != bool(args.eval):
        print("gemb soup: error: --greedy needs --eval TASKS (the validation tasks), and --eval "
              "is only for --greedy.", file=sys.stderr)
        return 2
    if args.greedy and args.weights is not None:
        print("gemb soup: error: a greedy soup is uniform over the ingredients it keeps; drop "
              "--weights.", file=sys.stderr)
        return 2
    ingredients = [Ingredient.parse(spec, weight) for spec, weight in zip(args.model, weights)]
    try:
        if args.greedy:
            report = greedy_soup(ingredients, args.out, eval_score(args.eval, args.max_length),
                                 args.work_dir, tokenizer_from=args.tokenizer_from)
            print(f"Wrote the greedy soup of {len(report['ingredients'])} of "
                  f"{len(ingredients)} checkpoints to {args.out} (score {report['score']:.4f}; "
                  f"left out: {[d['ingredient'] for d in report['decisions'] if not d['kept']]})")
            return 0
        out = make_soup(ingredients, args.out, tokenizer_from=args.tokenizer_from)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"gemb soup: error: {error}", file=sys.stderr)
        return 1
    print(f"Wrote the soup of {len(ingredients)} checkpoints to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
