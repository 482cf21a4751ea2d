"""`gemb sweep`: a sweep file expands into named runs (grid x seeded draws), the emitted xpk /
TPU VM / SLURM commands are exactly the launch scripts' command lines, and a sweep of 4 TINY
runs trains end to end, prints its table and skips its finished runs when run again."""

import csv
import json
import math
import re
import shlex

import pytest

from gemb import sweep as sweep_lib
from gemb.train import metrics_writer

SWEEP = """
name = "lr_temp"
gin_files = ["gin/runs/tiny_synthetic.gin", "gin/partitioning/dp.gin"]
bindings = ["train.num_steps = 3", "encoder_config.num_layers = 1"]
root = "{root}"

[grid]
"OptimizerConfig.learning_rate" = [1e-3, 3e-3]
"ContrastiveLossConfig.temperature" = [0.02, 0.05]
"""

RANDOM = """
[random]
count = 3
seed = 7
"OptimizerConfig.weight_decay" = {log_uniform = [1e-4, 1e-1]}
"SeqioData.seed" = {choice = [0, 1, 2]}
"OptimizerConfig.warmup_steps" = {int_uniform = [5, 20]}
"""


def _write(tmp_path, text, name="sweep.toml"):
    path = tmp_path / name
    path.write_text(text.replace("{root}", str(tmp_path / "runs")))
    return path


def test_a_grid_with_draws_expands_into_named_seeded_runs(tmp_path):
    sweep = sweep_lib.load_sweep(_write(tmp_path, SWEEP + RANDOM))
    runs = sweep_lib.expand(sweep)
    assert [r.name for r in runs] == [f"lr_temp-{i:03d}" for i in range(12)]  # 2 x 2 x 3
    assert runs[5].model_dir == tmp_path / "runs" / "lr_temp" / "lr_temp-005"
    grid = [(dict(r.bindings)["OptimizerConfig.learning_rate"],
             dict(r.bindings)["ContrastiveLossConfig.temperature"]) for r in runs]
    assert grid == [(lr, t) for lr in (1e-3, 3e-3) for t in (0.02, 0.05) for _ in range(3)]
    for run in runs:
        values = dict(run.bindings)
        assert 1e-4 <= values["OptimizerConfig.weight_decay"] <= 1e-1
        assert values["SeqioData.seed"] in (0, 1, 2)
        assert 5 <= values["OptimizerConfig.warmup_steps"] <= 20
        assert isinstance(values["OptimizerConfig.warmup_steps"], int)
    assert runs == sweep_lib.expand(sweep)  # seeded: the same runs on every call
    decays = [math.log10(dict(r.bindings)["OptimizerConfig.weight_decay"]) for r in runs]
    assert len(set(decays)) == 12 and min(decays) < -2.5 < max(decays)  # spread over decades

    assert sweep_lib.train_args(sweep, runs[0]) == [
        "--gin_file=gin/runs/tiny_synthetic.gin", "--gin_file=gin/partitioning/dp.gin",
        "--gin.train.num_steps=3", "--gin.encoder_config.num_layers=1",
        f"--gin.MODEL_DIR='{tmp_path}/runs/lr_temp/lr_temp-000'",
        "--gin.OptimizerConfig.learning_rate=0.001",
        "--gin.ContrastiveLossConfig.temperature=0.02",
        f"--gin.OptimizerConfig.weight_decay={runs[0].bindings[2][1]!r}",
        f"--gin.SeqioData.seed={runs[0].bindings[3][1]}",
        f"--gin.OptimizerConfig.warmup_steps={runs[0].bindings[4][1]}"]
    assert sweep_lib.gin_value("a'b") == '"a\'b"' and sweep_lib.gin_value([1, "x"]) == "(1, 'x', )"


@pytest.mark.parametrize("text, message", [
    ('gin_files = ["a.gin"]', "`name`"),
    ('name = "x"', "`gin_files`"),
    ('name = "x"\ngin_files = ["a.gin"]\n[grid]\n"a.b" = []', "grid.a.b must be a non-empty"),
    ('name = "x"\ngin_files = ["a.gin"]\n[random]\n"a.b" = {normal = [0, 1]}', "random.a.b"),
    ('name = "x"\ngin_files = ["a.gin"]\n[random]\n"a.b" = {uniform = [0, 1]}', "count = N"),
    ('name = "x"\ngin_files = ["a.gin"]\nrepeat = 2', "unknown keys ['repeat']"),
    ('name = "x"\ngin_files = ["a.gin"', "not valid TOML"),
])
def test_bad_sweep_files_name_the_fix(tmp_path, text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        sweep_lib.load_sweep(_write(tmp_path, text))
    assert sweep_lib.main(["run", str(_write(tmp_path, text)), "--dry_run"]) == 2


def test_emitted_launch_commands_are_exact(tmp_path):
    sweep = sweep_lib.load_sweep(_write(tmp_path, SWEEP))
    runs = sweep_lib.expand(sweep)
    flags = [["--gin_file=gin/partitioning/dp.gin", "--gin.train.num_steps=3",
              "--gin.encoder_config.num_layers=1", f"--gin.OptimizerConfig.learning_rate={lr}",
              f"--gin.ContrastiveLossConfig.temperature={t}"]
             for lr in ("0.001", "0.003") for t in ("0.02", "0.05")]
    dirs = [str(run.model_dir) for run in runs]
    xpk = sweep_lib.emit(sweep, "xpk", ["c1", "v5p-8", "1", "gcr.io/p/gemb:1"])
    assert xpk[1] == shlex.join(["launch/xpk.sh", "c1", "v5p-8", "1", "gcr.io/p/gemb:1",
                                 "gin/runs/tiny_synthetic.gin", dirs[1], *flags[1]])
    assert xpk[0] == (
        f"launch/xpk.sh c1 v5p-8 1 gcr.io/p/gemb:1 gin/runs/tiny_synthetic.gin {dirs[0]} "
        "--gin_file=gin/partitioning/dp.gin --gin.train.num_steps=3 "
        "--gin.encoder_config.num_layers=1 --gin.OptimizerConfig.learning_rate=0.001 "
        "--gin.ContrastiveLossConfig.temperature=0.02")
    tpu = sweep_lib.emit(sweep, "tpu_vm", ["my-pod", "us-central2-b"])
    assert tpu[3] == shlex.join(["launch/tpu_vm_pod.sh", "my-pod", "us-central2-b",
                                 "gin/runs/tiny_synthetic.gin", dirs[3], *flags[3]])
    [slurm] = sweep_lib.emit(sweep, "slurm", ["--nodes=2"])
    table = tmp_path / "runs" / "lr_temp" / "slurm_runs.tsv"
    assert slurm == (f"sbatch --array=0-3 --job-name=gemb-lr_temp --nodes=2 "
                     f"launch/slurm_sweep.sbatch {table}")
    assert table.read_text().splitlines() == [
        "\t".join(["gin/runs/tiny_synthetic.gin", d, *f]) for d, f in zip(dirs, flags)]
    with pytest.raises(ValueError, match="CLUSTER TPU_TYPE NUM_SLICES IMAGE"):
        sweep_lib.emit(sweep, "xpk", ["c1"])
    # A finished run is not emitted again.
    (runs[0].model_dir).mkdir(parents=True)
    (runs[0].model_dir / sweep_lib.DONE_FILE).write_text("{}")
    assert len(sweep_lib.emit(sweep, "xpk", ["c1", "v5p-8", "1", "img"])) == 3


@pytest.mark.slow
def test_four_tiny_runs_end_to_end_then_a_rerun_skips_them(tmp_path, capsys):
    path = _write(tmp_path, SWEEP)
    sweep = sweep_lib.load_sweep(path)
    assert sweep_lib.main(["run", str(path), "--parallel", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 runs, 0 already finished, 4 to run" in out
    assert "| run | status | OptimizerConfig.learning_rate |" in out
    rows = list(csv.DictReader((sweep.folder / "results.csv").open()))
    assert [r["status"] for r in rows] == ["done"] * 4
    assert all(r["step"] == "3" and math.isfinite(float(r["loss"])) for r in rows)
    assert len({r["loss"] for r in rows}) == 4  # four different trainings
    for run in sweep_lib.expand(sweep):
        assert json.loads((run.model_dir / sweep_lib.DONE_FILE).read_text())["bindings"] == \
            dict(run.bindings)
    # TensorBoard's HParams view: the experiment config and one session per run.
    tags = metrics_writer.read_scalars(sweep.folder / "hparams" / "lr_temp-002")
    assert "loss" in tags
    assert any(p.name.startswith("events.out") for p in (sweep.folder / "hparams").iterdir())

    assert sweep_lib.main(["run", str(path)]) == 0
    assert "4 runs, 4 already finished, 0 to run" in capsys.readouterr().out
    assert sweep_lib.main(["run", str(path), "--dry_run"]) == 0
    assert capsys.readouterr().out.count("# done: gemb train") == 4
