"""The compute core imports without TensorFlow or seqio (DESIGN.md convention 10): accelerator
machines often lack TF, and serving needs none of it. Only gemb/data and the CLI's data paths
may import them."""

import subprocess
import sys

import pytest

from gemb import cli

CORE_MODULES = [
    "gemb.models.encoder", "gemb.losses", "gemb.partitioning.partitioner",
    "gemb.checkpoints.convert", "gemb.checkpoints.import_hf", "gemb.checkpoints.model_dir",
    "gemb.embed", "gemb.tokenizer", "gemb.train.trainer", "gemb.train.state",
    "gemb.train.checkpointing", "gemb.train.optimizers", "gemb.data.templates", "gemb.cli",
    "gemb.soup", "gemb.export.hf", "gemb.export.sentence_transformers", "gemb.progress",
]


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_imports_without_tensorflow(module):
    code = (f"import sys, {module}; "
            "loaded = [m for m in ('tensorflow', 'seqio') if m in sys.modules]; "
            "print(loaded); sys.exit(1 if loaded else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"{module} imported {result.stdout.strip()} {result.stderr[-2000:]}"


def test_cli_lists_commands_and_rejects_unknown_ones(capsys):
    assert cli.main(["--help"]) == 0
    assert "convert" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2
