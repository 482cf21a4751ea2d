"""The compute core imports without TensorFlow or seqio (docs/design.md, convention 10): accelerator
machines often lack TF, and serving needs none of it. Only gemb/data and the CLI's data paths
may import them."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from gemb import cli

CORE_MODULES = [
    "gemb.models.encoder", "gemb.losses", "gemb.partitioning.partitioner",
    "gemb.checkpoints.convert", "gemb.checkpoints.import_hf", "gemb.checkpoints.model_dir",
    "gemb.embed", "gemb.tokenizer", "gemb.train.trainer", "gemb.train.state",
    "gemb.train.checkpointing", "gemb.train.optimizers", "gemb.data.templates", "gemb.cli",
    "gemb.soup", "gemb.export.hf", "gemb.export.sentence_transformers", "gemb.progress",
    "gemb.train.model", "gemb.train.data", "gemb.train.run", "gemb.train.gin_registry",
    "gemb.data.feature_converter", "gemb.eval.hook",
]
GEMB = Path(__file__).resolve().parents[1] / "gemb"


def _imports_tensorflow(modules) -> subprocess.CompletedProcess:
    """Imports `modules` in a fresh interpreter; exit code 1 if TensorFlow or seqio was loaded."""
    code = (f"import sys, {', '.join(modules)}; "
            "loaded = [m for m in ('tensorflow', 'seqio') if m in sys.modules]; "
            "print(loaded); sys.exit(1 if loaded else 0)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_core_modules_import_without_tensorflow():
    # What importing a module loads is a subset of what importing it with others loads, so one
    # interpreter importing them all proves each; only a failure needs one interpreter each, to
    # name the module that pulled TensorFlow in.
    if _imports_tensorflow(CORE_MODULES).returncode == 0:
        return
    failures = {}
    for module in CORE_MODULES:
        result = _imports_tensorflow([module])
        if result.returncode != 0:
            failures[module] = f"{result.stdout.strip()} {result.stderr[-2000:]}"
    assert not failures, f"core modules importing TensorFlow or seqio: {failures}"


def test_cli_lists_commands_and_rejects_unknown_ones(capsys):
    assert cli.main(["--help"]) == 0
    assert "convert" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2


def _module_imports() -> dict[str, set[str]]:
    """{gemb module: the gemb modules it imports at module level (not inside functions)}."""
    graph = {}
    for path in GEMB.rglob("*.py"):
        name = ".".join(path.relative_to(GEMB.parent).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        imported = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gemb"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    is_module = (GEMB.parent / Path(*full.split("."))).with_suffix(".py").exists()
                    imported.add(full if is_module else node.module)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names if a.name.startswith("gemb"))
        graph[name] = imported
    return graph


def test_no_import_circle():
    graph = _module_imports()
    state: dict[str, str] = {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                raise AssertionError("import circle: " + " -> ".join(path + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("package", ["models", "losses", "partitioning", "data"])
def test_library_packages_import_no_gin(package):
    """gin wires top-level objects only (gemb/train/gin_registry.py is the one registry)."""
    for path in (GEMB / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "gin" or n.startswith("gin.") for n in names), path


def test_a_run_on_prepared_tasks_imports_no_tensorflow_seqio_or_tokenizer(tmp_path):
    # Training from prepared (pre-tokenised) tasks builds its batches without TensorFlow, seqio or
    # a tokenizer library: only numpy, ArrayRecord's reader and the feature converter.
    code = f"""
import sys
from gemb.data import prepared
from gemb.data.feature_converter import FeatureConverterConfig
from gemb.train.data import DataShard, SeqioData
prepared.write_synthetic_task({str(tmp_path / 'pairs')!r}, 64, 2, task='pairs', vocab_size=100)
data = SeqioData(batch_size=8, prepared={{'pairs': {str(tmp_path / 'pairs')!r}}},
                 rates={{'pairs': 1.0}}, features=FeatureConverterConfig(query_length=16,
                 document_length=16, pack=True))
batch = next(data.make(None, DataShard()))
assert batch, batch
loaded = [m for m in ('tensorflow', 'seqio', 'sentencepiece', 'tokenizers') if m in sys.modules]
print(loaded)
sys.exit(1 if loaded else 0)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
