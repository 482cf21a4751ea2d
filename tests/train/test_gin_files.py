"""Every gin file parses and builds its objects; gin's errors name the bad binding or macro."""

import gin
import pytest

from gemb import paths
from gemb.models.config import EncoderConfig
from gemb.train import main as train_main

EXPECTED_MESHES = {
    "dp": {"data": 8, "fsdp": 1, "tensor": 1},
    "fsdp": {"data": 1, "fsdp": 8, "tensor": 1},
    "fsdp_tp": {"data": 1, "fsdp": 4, "tensor": 2},
}

GIN = paths.REPO_ROOT / "gin"
MODEL_FILES = sorted((GIN / "models").glob("*.gin"))
PARTITIONING_FILES = sorted((GIN / "partitioning").glob("*.gin"))
MIXTURE_FILES = sorted((GIN / "mixtures").glob("*.gin"))


@pytest.fixture(autouse=True)
def clear_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def fake_model_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    return folder


def dry_run(files, bindings):
    train_main.parse_gin([str(f) for f in files], bindings)
    return gin.get_configurable("train")(dry_run=True)


@pytest.mark.parametrize("model_file", MODEL_FILES, ids=lambda p: p.stem)
def test_model_files_build_their_encoder(model_file):
    train_main.parse_gin([str(model_file)], [])
    encoder = gin.get_configurable("encoder_config")()
    assert isinstance(encoder, EncoderConfig)
    assert encoder.transformer.name == model_file.stem


@pytest.mark.parametrize("partitioning_file", PARTITIONING_FILES, ids=lambda p: p.stem)
def test_partitioning_files_build_a_mesh_on_eight_devices(partitioning_file, tmp_path):
    result = dry_run([GIN / "runs" / "tiny_synthetic.gin", partitioning_file],
                     [f"MODEL_DIR = '{tmp_path}'"])
    assert result["mesh"] == EXPECTED_MESHES[partitioning_file.stem]
    assert result["num_params"] > 0


def test_quickstart_builds(tmp_path, fake_model_folder):
    result = dry_run([GIN / "runs" / "quickstart.gin"],
                     [f"MODEL_DIR = '{tmp_path / 'run'}'", f"MODEL_FOLDER = '{fake_model_folder}'"])
    assert result["num_trainable"] < result["num_params"] / 5  # embedding + 15 layers frozen
    assert result["data"].batch_size == 16 and result["data"].mixture == "gemb_quickstart"
    assert (result["data"].features.query_length, result["data"].features.document_length) == (32, 64)
    hook = result["eval_hook"]
    assert hook.at_start and [task.name for task in hook.task_list] == ["docstring_code"]


@pytest.mark.parametrize("run_file", ["pretrain", "finetune"])
@pytest.mark.parametrize("mixture_file", MIXTURE_FILES, ids=lambda p: p.stem)
def test_pretrain_and_finetune_build(run_file, mixture_file, tmp_path, fake_model_folder):
    files = [GIN / "models" / "gemma3_270m.gin", GIN / "runs" / f"{run_file}.gin", mixture_file]
    result = dry_run(files, [f"MODEL_DIR = '{tmp_path / 'run'}'",
                             f"INIT_FROM = '{fake_model_folder}'",
                             f"VOCABULARY_DIR = '{fake_model_folder}'",
                             f"PRETRAIN_DATA = '{tmp_path / 'prepared'}'"])
    assert result["data"].batch_size >= 512
    assert result["mesh"]["fsdp"] == 8
    assert result["data"].prepared is None  # a mixture file replaces the run's data


def test_pretrain_streams_its_prepared_pairs(tmp_path, fake_model_folder):
    files = [GIN / "models" / "gemma3_270m.gin", GIN / "runs" / "pretrain.gin"]
    result = dry_run(files, [f"MODEL_DIR = '{tmp_path / 'run'}'",
                             f"INIT_FROM = '{fake_model_folder}'",
                             f"PRETRAIN_DATA = '{tmp_path / 'prepared'}'"])
    data = result["data"]
    assert data.prepared == {"gemb_system_pretrain": str(tmp_path / "prepared")}
    assert data.rates == {"gemb_system_pretrain": 1.0} and data.batch_size == 4096


def test_unknown_binding_names_it(tmp_path):
    with pytest.raises(ValueError, match="no_such_parameter"):
        dry_run([GIN / "runs" / "tiny_synthetic.gin"],
                [f"MODEL_DIR = '{tmp_path}'", "OptimizerConfig.no_such_parameter = 1"])


def test_missing_macro_names_it():
    with pytest.raises(Exception, match="MODEL_DIR"):
        dry_run([GIN / "runs" / "tiny_synthetic.gin"], [])


def test_run_files_start_with_the_command_and_macros():
    for path in sorted((GIN / "runs").rglob("*.gin")):
        head = path.read_text().split("\n\n")[0]
        assert head.startswith("#") and "gemb train" in head, path
        assert "macros" in head.lower(), path


def test_cli_flags_are_t5x_style():
    args = train_main.parse_flags(["--gin_file=a.gin", "--gin_file", "b.gin",
                                   "--gin.MODEL_DIR='x'", "--gin.train.num_steps=3"])
    assert args.gin_file == ["a.gin", "b.gin"]
    assert args.bindings == ["MODEL_DIR='x'", "train.num_steps=3"]


def test_the_recipe_at_cpu_scale_builds(tmp_path, fake_model_folder):
    """gin/runs/recipe: pre-finetuning on prepared pairs with a gradient-cached batch and no
    hard negatives; fine-tuning on the shared tasks plus the mined CoSQA task with K = 1."""
    common = [f"MODEL_FOLDER = '{fake_model_folder}'"]
    pre = dry_run([GIN / "runs" / "recipe" / "pretrain.gin"],
                  [*common, f"MODEL_DIR = '{tmp_path / 'pre'}'",
                   f"PRETRAIN_DATA = '{tmp_path / 'pairs'}'"])
    assert pre["data"].prepared == {"gemb_system_pretrain": str(tmp_path / "pairs")}
    assert pre["data"].features.num_negatives == 0 and pre["data"].batch_size == 64
    assert pre["trainer"].step_config.gradient_cache_chunk == 16
    assert pre["num_trainable"] < pre["num_params"] / 3  # embedding + 12 layers frozen
    gin.clear_config()
    fine = dry_run([GIN / "runs" / "recipe" / "finetune.gin"],
                   [*common, f"MODEL_DIR = '{tmp_path / 'ft'}'",
                    f"INIT_FROM = '{fake_model_folder}'",
                    f"COSQA_MINED = '{tmp_path / 'cosqa'}'"])
    data = fine["data"]
    assert data.prepared == {"gemb_cosqa_mined": str(tmp_path / "cosqa")}
    assert data.features.num_negatives == 1
    assert set(data.rates) == {"gemb_docstring_code", "gemb_snli_triplets",
                               "gemb_banking77_train", "gemb_cosqa_mined"}
    assert not any("stsb" in name for name in data.rates)  # STS stays zero-shot
