"""Mixtures: which tasks a run trains on, and at what rates.

A rate is the relative probability that a batch comes from a task (every batch holds examples
of one task only, see gemb.data.batching). Rates are relative weights, not example counts, and
need not sum to one. Built-in mixtures:

  gemb_quickstart       the offline docstring->code corpus alone (works on every machine)
  gemb_shared_finetune  docstring->code + the ../shared/data tasks that are registered

Change the rates or define a mixture from gin without code, through the training data:

  SeqioData.mixture = 'my_mix'
  SeqioData.rates = {'gemb_docstring_code': 3, 'gemb_snli_triplets': 1}

Tasks named in a mixture but not registered (a ../shared task on a machine without that folder)
are left out with a warning, unless `require_all_tasks=True`.
"""

from __future__ import annotations

import logging
from typing import Mapping, Optional

import seqio

from gemb.data import tasks, templates
from gemb.data.quality import QualityPolicy

log = logging.getLogger(__name__)

QUICKSTART = "gemb_quickstart"
SHARED_FINETUNE = "gemb_shared_finetune"

DEFAULT_RATES: dict[str, dict[str, float]] = {
    QUICKSTART: {tasks.DOCSTRING_CODE: 1.0},
    # Task diversity matters more than size in fine-tuning (docs/recipe.md), so the small shared sets
    # get rates close to the large code corpus rather than rates proportional to their sizes.
    # No STS-scored data (STSBenchmark, stsb_multi_mt): STS is evaluated zero-shot, as MTEB does.
    SHARED_FINETUNE: {
        tasks.DOCSTRING_CODE: 3.0,
        tasks.SNLI_TRIPLETS: 2.0,
        tasks.BANKING77_TRAIN: 1.0,
        tasks.COSQA_DEV: 0.5,
    },
}


def register_mixture(name: str, rates: Mapping[str, float], require_all_tasks: bool = False) -> seqio.Mixture:
    """Registers (or replaces) a seqio Mixture of registered tasks with the given rates."""
    entries = []
    for task_name, rate in sorted(rates.items()):
        if rate < 0:
            raise ValueError(f"mixture {name!r}: rate of {task_name!r} is negative ({rate})")
        if rate == 0:
            continue
        if task_name not in seqio.TaskRegistry.names():
            message = f"mixture {name!r}: task {task_name!r} is not registered"
            if require_all_tasks:
                raise ValueError(message + "; register it first (gemb.data.tasks).")
            log.warning("%s; leaving it out", message)
            continue
        entries.append((task_name, float(rate)))
    if not entries:
        raise ValueError(f"mixture {name!r} has no registered task with a positive rate (rates: {dict(rates)})")
    seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, entries)


def build_mixture(
    vocabulary: seqio.Vocabulary,
    name: str = QUICKSTART,
    rates: Optional[Mapping[str, float]] = None,
    require_all_tasks: bool = False,
    policy: Optional[QualityPolicy] = None,
    template_overrides: Optional[Mapping[str, templates.TemplateOverride]] = None,
) -> seqio.Mixture:
    """Registers the default tasks with `vocabulary` (and the run's bad-data policy and prompt
    overrides), then the mixture `name` with `rates`; rates=None uses DEFAULT_RATES[name].
    """
    if rates is None:
        if name not in DEFAULT_RATES:
            raise ValueError(f"no default rates for mixture {name!r}; pass rates= (known: {sorted(DEFAULT_RATES)})")
        rates = DEFAULT_RATES[name]
    tasks.register_default_tasks(vocabulary,
                                 include_shared=any(t in tasks.SHARED_TASKS for t in rates),
                                 policy=policy, template_overrides=template_overrides)
    return register_mixture(name, rates, require_all_tasks=require_all_tasks)
