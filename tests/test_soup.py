"""gemb soup: weighted parameter averages of model folders and run checkpoints."""

import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from gemb import embed, soup
from gemb.checkpoints import model_dir
from gemb.partitioning import mesh as mesh_lib
from gemb.partitioning import partitioner as partitioner_lib
from gemb.train import checkpointing, run
from tiny_checkpoints import write_tiny_model_folder
from train.helpers import LOSS, OPTIMIZER, SMALL, build, partitioner_for, synthetic_batches


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory):
    """Two converted TINY models that differ in every transformer weight; the second one is
    stored unscanned, so the soup must also re-lay out its layers."""
    return [write_tiny_model_folder(tmp_path_factory, seed=seed, head_dims=(96,),
                                    matryoshka_dims=(96, 48), scan_layers=scan)
            for seed, scan in ((0, True), (1, False))]


def test_weighted_soup_of_two_folders_equals_the_average(two_folders, tmp_path):
    first, second = two_folders
    out = soup.make_soup([soup.Ingredient(first, weight=3.0), soup.Ingredient(second, weight=1.0)],
                         tmp_path / "soup")
    got = _flat(model_dir.load_params(out))
    a = _flat(model_dir.load_params(first))
    # The second folder is unscanned: read it in the first one's (scanned) layout.
    config, _ = model_dir.read_model_config(first)
    b = _flat(checkpointing.relayout_layers(model_dir.load_params(second),
                                            model_dir.read_model_config(second)[0], config))
    assert set(got) == set(a) == set(b)
    differing = [name for name in a if not np.array_equal(a[name], b[name])]
    assert len(differing) > len(a) // 2  # the check below is not comparing equal folders
    for name in a:
        np.testing.assert_allclose(got[name], 0.75 * a[name] + 0.25 * b[name], rtol=1e-6,
                                   atol=1e-7, err_msg=name)
    record = json.loads((out / model_dir.CONFIG_FILENAME).read_text())
    assert record["source"] == "gemb soup"
    assert [i["weight"] for i in record["ingredients"]] == [0.75, 0.25]
    assert (out / "tokenizer.json").is_file()
    # The soup is a model folder like any other: gemb embed reads it.
    vectors = embed.load_encoder(out).encode(["the capital of france", "python code"])
    assert vectors.shape == (2, 96) and np.isfinite(vectors).all()


def test_sharded_soup_equals_unsharded(two_folders, tmp_path):
    ingredients = [soup.Ingredient(f) for f in two_folders]
    single = partitioner_lib.Partitioner(mesh_lib.create_mesh(devices=jax.devices()[:1]))
    fsdp = partitioner_lib.Partitioner(mesh_lib.create_mesh((2, 4, 1)))
    one = _flat(model_dir.load_params(soup.make_soup(ingredients, tmp_path / "a", single)))
    eight = _flat(model_dir.load_params(soup.make_soup(ingredients, tmp_path / "b", fsdp)))
    for name in one:
        np.testing.assert_array_equal(eight[name], one[name], err_msg=name)


def test_soup_of_one_run_at_two_steps(tmp_path):
    partitioner = partitioner_for((1, 1, 1), 1)
    _, state, steps = build(partitioner)
    ckpt = checkpointing.RunCheckpointer(tmp_path / "run", checkpointing.CheckpointConfig(keep=5))
    meta = run._model_meta(SMALL, LOSS, OPTIMIZER)
    saved = {}
    for i, batch in enumerate(synthetic_batches(3)):
        state, _ = steps.train_step(state, batch)
        ckpt.save(i + 1, state, {"batch_index": i + 1}, meta)
        saved[i + 1] = _flat(state.params["encoder"])
    ckpt.close()
    out = soup.make_soup([soup.Ingredient.parse(f"{tmp_path / 'run'}@1"),
                          soup.Ingredient.parse(str(tmp_path / "run"))],  # newest: step 3
                         tmp_path / "soup", partitioner)
    got = _flat(model_dir.load_params(out))
    changed = [n for n in got if not np.array_equal(saved[1][n], saved[3][n])]
    assert changed  # training moved the params between the two steps
    for name, value in got.items():
        np.testing.assert_allclose(value, (saved[1][name] + saved[3][name]) / 2, rtol=1e-6,
                                   atol=1e-7, err_msg=name)
    with pytest.raises(FileNotFoundError,
                       match=r"no checkpoint of step 7; it has steps \[1, 2, 3\]"):
        soup.make_soup([soup.Ingredient.parse(f"{tmp_path / 'run'}@7")], tmp_path / "x")
    for path in (tmp_path / "run" / "checkpoints" / "2" / "meta").iterdir():
        path.write_text("{ not json")  # a damaged meta record
    with pytest.raises(ValueError, match="cannot read the meta record of step 2"):
        soup.make_soup([soup.Ingredient.parse(f"{tmp_path / 'run'}@2")], tmp_path / "y")


def test_bad_soups_are_clear_errors(two_folders, tmp_path):
    first, _ = two_folders
    other = tmp_path / "other"
    config, _ = model_dir.read_model_config(first)
    bigger_head = config.replace(head_dims=(48,), matryoshka_dims=(48,))
    model_dir.save_model_dir(other, bigger_head, {"unused": np.zeros(1)}, {"source": "test"})
    with pytest.raises(ValueError, match=r"differs from .*head_dims"):
        soup.make_soup([soup.Ingredient(first), soup.Ingredient(other)], tmp_path / "s1")
    with pytest.raises(ValueError, match="sum to 0"):
        soup.make_soup([soup.Ingredient(first, weight=0.0)], tmp_path / "s2")
    with pytest.raises(ValueError, match=">= 0"):
        soup.make_soup([soup.Ingredient(first, weight=-1.0)], tmp_path / "s3")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        soup.make_soup([soup.Ingredient(tmp_path / "nowhere")], tmp_path / "s4")
    with pytest.raises(ValueError, match="model folder: it holds one set of params"):
        soup.make_soup([soup.Ingredient.parse(f"{first}@5")], tmp_path / "s5")
    with pytest.raises(FileExistsError, match="already holds a model"):
        soup.make_soup([soup.Ingredient(first)], first)


def test_cli(two_folders, tmp_path, capsys):
    first, second = two_folders
    assert soup.main(["--model", str(first), "--model", str(second), "--weights", "1",
                      "--out", str(tmp_path / "s")]) == 2
    assert "1 weights for 2 --model" in capsys.readouterr().err
    assert soup.main(["--model", str(first), "--model", str(second), "--weights", "1,1",
                      "--out", str(tmp_path / "s")]) == 0
    assert "Wrote the soup of 2 checkpoints" in capsys.readouterr().out
    assert (tmp_path / "s" / model_dir.CONFIG_FILENAME).is_file()


def _perturbed_folder(base, out, noise, seed):
    """A copy of the model folder `base` with every parameter moved by `noise` x N(0, 1)."""
    config, _ = model_dir.read_model_config(base)
    params = model_dir.load_params(base)
    rng = np.random.default_rng(seed)
    moved = jax.tree.map(lambda p: np.asarray(p) + noise * rng.standard_normal(p.shape).astype(
        np.asarray(p).dtype), params)
    model_dir.save_model_dir(out, config, moved, {"source": "test"})
    model_dir.copy_tokenizer(base, out)
    return out


def test_greedy_soup_leaves_out_a_bad_ingredient_and_the_uniform_soup_does_not(
        two_folders, tmp_path):
    """Two fine-tunes of one model (its params plus small noise) and one unrelated model
    (random params). Validation score: closeness to the model they were tuned from (averaging the
    fine-tunes' noise brings the soup closer; the bad ingredient pulls it away)."""
    base = two_folders[0]
    target = _flat(model_dir.load_params(base))
    good = [soup.Ingredient(_perturbed_folder(base, tmp_path / f"good{i}", 0.05, seed=i))
            for i in range(2)]
    # Unrelated: noise far larger than the weights themselves.
    bad = soup.Ingredient(_perturbed_folder(base, tmp_path / "bad", 1.0, seed=9))

    def score(folder):
        got = _flat(model_dir.load_params(folder))
        return -float(np.mean([np.mean((got[k] - target[k]) ** 2) for k in target]))

    ingredients = [good[0], bad, good[1]]
    report = soup.greedy_soup(ingredients, tmp_path / "greedy", score)
    assert set(report["ingredients"]) <= {g.label for g in good}
    assert len(report["ingredients"]) == 2  # averaging the fine-tunes helped: both kept
    [left_out] = [d for d in report["decisions"] if not d["kept"]]
    assert left_out["ingredient"] == bad.label and left_out["score_alone"] < min(
        d["score_alone"] for d in report["decisions"] if d["kept"])
    uniform = soup.make_soup(ingredients, tmp_path / "uniform")
    assert score(tmp_path / "greedy") == pytest.approx(report["score"])
    assert score(uniform) < report["score"]  # the uniform soup keeps the bad one, and pays
    assert json.loads((tmp_path / "greedy" / "greedy_soup.json").read_text()) == report


def test_greedy_soup_cli_scores_with_eval_tasks(two_folders, tmp_path, capsys):
    """`gemb soup --greedy --eval TASK` on a small retrieval task (the plumbing: candidates
    written and scored through gemb's evaluator)."""
    folder = tmp_path / "task"
    (folder / "qrels").mkdir(parents=True)
    words = ["the", "a", "man", "woman", "dog", "cat", "plays", "runs", "reads", "code"]
    (folder / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": f"d{i}", "text": " ".join(words[i:] + words[:i])}) + "\n"
        for i in range(10)))
    (folder / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"q{i}", "text": " ".join(words[i:i + 3])}) + "\n" for i in range(10)))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t1\n" for i in range(10)))
    args = ["--greedy", "--eval", f"retrieval:{folder}", "--model", str(two_folders[0]),
            "--model", str(two_folders[1]), "--out", str(tmp_path / "soup")]
    assert soup.main(args) == 0
    report = json.loads((tmp_path / "soup" / "greedy_soup.json").read_text())
    assert len(report["decisions"]) == 2 and 0 <= report["score"] <= 1
    assert "Wrote the greedy soup of" in capsys.readouterr().out
    assert soup.main(["--greedy", "--model", str(two_folders[0]), "--out",
                      str(tmp_path / "x")]) == 2
