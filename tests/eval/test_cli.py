"""gemb eval end to end with a fake encoder: files written, lines printed, errors explained."""

import json
import subprocess
import sys

import pytest

from gemb.eval import cli, encoders, runner
from gemb.eval.hook import EvalHook
from gemb.eval.tasks import parse_task


@pytest.fixture
def fake_models(monkeypatch, hashing_encoder):
    """`--model fake:*` loads the hashing encoder; anything else goes to the real loader."""
    real = encoders.load_encoder

    def load(spec, dim=None, device="cpu", head=True, max_length=None):
        if spec.startswith("fake:"):
            return hashing_encoder
        return real(spec, dim=dim, device=device, head=head, max_length=max_length)

    monkeypatch.setattr(encoders, "load_encoder", load)
    return hashing_encoder


@pytest.fixture
def sts_file(tmp_path):
    path = tmp_path / "toy_sts.tsv"
    rows = ["sentence1\tsentence2\tscore", "a cat sits\ta cat sits\t5", "a cat sits\ta dog runs\t1",
            "red car\tred car fast\t4", "red car\tblue sky\t0"]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_eval_writes_json_table_and_prints_scores(tmp_path, sts_file, fake_models, capsys):
    out = tmp_path / "out"
    code = cli.main(["--model", "fake:a", "--tasks", f"sts:{sts_file}?name=Toy",
                     "--output", str(out), "--no-progress"])
    assert code == 0
    record = json.loads((out / "Toy.json").read_text())
    assert record["task_type"] == "sts" and record["main_score_name"] == "cosine_spearman"
    line = capsys.readouterr().out.strip().splitlines()[-1]
    name, score = line.split("\t")
    assert name == "Toy" and score == f"{100 * record['main_score']:.2f}"
    assert "| Toy |" in (out / runner.RESULTS_TABLE).read_text()


def test_table_of_results_folders_from_separate_runs(tmp_path, sts_file, fake_models, capsys):
    for model in ("fake:a", "fake:b"):
        assert cli.main(["--model", model, "--tasks", f"sts:{sts_file}?name=Toy",
                         "--output", str(tmp_path / model[-1]), "--no-progress"]) == 0
    scores = {m: json.loads((tmp_path / m / "Toy.json").read_text())["main_score"]
              for m in "ab"}
    capsys.readouterr()
    assert cli.main(["--table", str(tmp_path / "a"), str(tmp_path / "b"),
                     "--output", str(tmp_path / "joint")]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "| task | fake:a | fake:b |"
    assert printed.splitlines()[2] == (f"| Toy | {100 * scores['a']:.2f} | "
                                       f"{100 * scores['b']:.2f} |")
    assert (tmp_path / "joint" / runner.RESULTS_TABLE).read_text() == printed
    # Named, a row per model (docs/results.md's layout).
    assert cli.main(["--table", f"model A (= a)={tmp_path / 'a'}", str(tmp_path / "b"),
                     "--models-as-rows"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "| model | Toy |", "|---|---:|", f"| model A (= a) | {100 * scores['a']:.2f} |",
        f"| fake:b | {100 * scores['b']:.2f} |"]
    assert cli.main(["--table", str(tmp_path / "missing")]) == 2
    assert "not a results folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["--table", str(tmp_path / "empty")]) == 2
    assert "holds no task results" in capsys.readouterr().err


def test_several_models_and_one_that_cannot_load(tmp_path, sts_file, fake_models, capsys):
    code = cli.main(["--model", "fake:a", "--model", str(tmp_path / "no_such_model"),
                     "--tasks", f"sts:{sts_file}", "--output", str(tmp_path / "out"),
                     "--no-progress"])
    assert code == 1
    captured = capsys.readouterr()
    table = (tmp_path / "out" / runner.RESULTS_TABLE).read_text()
    assert "fake:a" in table and "n/a" in table and "was not run" in table
    assert "no such folder" in captured.err
    assert any(line.startswith("fake:a\ttoy_sts\t") for line in captured.out.splitlines())


def test_a_failing_task_does_not_stop_the_others(tmp_path, sts_file, fake_models, capsys):
    code = cli.main(["--model", "fake:a", "--tasks",
                     f"sts:{tmp_path}/missing.tsv,sts:{sts_file}", "--output",
                     str(tmp_path / "o"), "--no-progress"])
    assert code == 1
    captured = capsys.readouterr()
    assert "missing\tn/a" in captured.out and "toy_sts\t" in captured.out
    assert "does not exist" in captured.err


def test_bad_command_lines(capsys):
    assert cli.main(["--model", "st:x"]) == 2
    assert cli.main(["--model", "st:x", "--tasks", "no-such-task"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert cli.main(["--model", "st:x", "--tasks", "stsb", "--dim", "0"]) == 2


def test_list_tasks(capsys):
    assert cli.main(["--list-tasks"]) == 0
    assert "STSBenchmark\tsts" in capsys.readouterr().out


def test_not_a_gemb_model_folder_is_named(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="not a gemb model folder"):
        encoders.load_encoder(str(model_dir))


@pytest.mark.slow
def test_a_gemb_model_folder_is_scored_through_gemb_embed(tmp_path, capsys):
    """A real (TINY, random) gemb model folder, with and without its head, on an STS file."""
    from gemb.checkpoints import convert
    from tiny_checkpoints import WORDS, write_tiny_hf_checkpoint, write_word_level_tokenizer

    source = tmp_path / "hf"
    write_tiny_hf_checkpoint(source)
    write_word_level_tokenizer(source)
    model_dir = convert.convert(str(source), tmp_path / "model", head_dims=(96,), matryoshka_dims=(96, 48))
    rows = ["sentence1\tsentence2\tscore"]
    for i in range(12):
        rows.append(f"{WORDS[i]} {WORDS[i + 1]}\t{WORDS[i + 2]} {WORDS[i]}\t{i % 5}")
    sts_file = tmp_path / "sts.tsv"
    sts_file.write_text("\n".join(rows) + "\n")
    scores = {}
    for extra, suffix in (([], ""), (["--head", "none"], " (head none)"),
                          (["--dim", "48"], " (dim 48)"),
                          (["--max-length", "2"], " (max 2 tokens)")):
        assert cli.main(["--model", str(model_dir), "--tasks", f"sts:{sts_file}",
                         "--output", str(tmp_path / "out"), "--no-progress", *extra]) == 0
        line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("sts")][0]
        score = float(line.split("\t")[1])
        assert -100.0 <= score <= 100.0
        # The results file names what was scored.
        record = json.loads((tmp_path / "out" / "sts.json").read_text())
        assert record["model"] == str(model_dir) + suffix
        scores[suffix] = score
    assert scores[""] != scores[" (head none)"]  # the head really was left out
    # --max-length reaches the encoder: BOS and one word of each two-word sentence remain.
    assert encoders.load_encoder(str(model_dir), max_length=2).max_length == 2
    assert scores[" (max 2 tokens)"] != scores[""]


def test_st_spec_errors():
    with pytest.raises(FileNotFoundError, match="no installed package"):
        encoders.resolve_sentence_transformers_path("surely-not-a-package")


def test_eval_imports_neither_jax_nor_tensorflow():
    code = ("import sys, gemb.eval.cli, gemb.eval.runner, gemb.eval.tasks, gemb.eval.encoders; "
            "bad = [m for m in ('jax', 'tensorflow', 'seqio') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_eval_hook_scores_tasks_through_the_runner(sts_file, hashing_encoder, capsys):
    """The training hook uses the same tasks and runner as gemb eval; a broken task is reported
    and left out instead of ending the training run."""
    hook = EvalHook(tasks=[f"sts:{sts_file}", "sts:/nowhere/missing.tsv?name=gone"],
                    metrics=("main_score", "cosine_pearson"))
    scores = hook.run(10, hashing_encoder)
    expected = runner.run_tasks(hashing_encoder, [parse_task(f"sts:{sts_file}")], model_name="x")
    assert scores["toy_sts/main_score"] == expected[0].main_score
    assert "toy_sts/cosine_pearson" in scores and not any(key.startswith("gone/") for key in scores)
    assert "task gone" in capsys.readouterr().err
