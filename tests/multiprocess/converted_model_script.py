"""Run by test_model_conversion.py as one of several JAX processes of one job: every process asks
gin's converted_model() for the same folder, as each process of a job on one shared home does.
Prints one JSON line: the folder it got and the process index."""

import json
import sys

import jax

from gemb import distributed

distributed.initialize()

from gemb.train import gin_registry  # noqa: E402  (after the distributed start)

source, folder = sys.argv[1:3]
result = gin_registry.converted_model(source, folder=folder)
print(json.dumps({"process": jax.process_index(), "folder": result}), flush=True)
