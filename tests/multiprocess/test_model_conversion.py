"""The processes of one job ask gin's converted_model() for the same folder (as every process of a
multi-host run whose gin names it): they convert together into one staging folder, process 0
renames it into place, and the folder equals a one-process conversion."""

import json

import jax
import numpy as np

from gemb.checkpoints import convert, model_dir

import mp_harness


def test_two_processes_convert_one_folder_equal_to_one_process(tmp_path):
    from tiny_checkpoints import write_tiny_hf_checkpoint, write_word_level_tokenizer

    source = tmp_path / "hf"
    write_tiny_hf_checkpoint(source)
    write_word_level_tokenizer(source)
    out = tmp_path / "cache" / "tiny"
    results = mp_harness.run_python(
        ["tests/multiprocess/converted_model_script.py", str(source), str(out)], 2, timeout=300)
    reports = [json.loads(r.output.strip().splitlines()[-1]) for r in results]
    assert [r["process"] for r in reports] == [0, 1]
    assert [r["folder"] for r in reports] == [str(out)] * 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no staging folder left
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()

    alone = convert.convert(str(source), tmp_path / "alone")
    config, _ = model_dir.read_model_config(out)
    assert config == model_dir.read_model_config(alone)[0]
    together, single = model_dir.load_params(out), model_dir.load_params(alone)
    assert jax.tree_util.tree_structure(together) == jax.tree_util.tree_structure(single)
    for a, b in zip(jax.tree_util.tree_leaves(together), jax.tree_util.tree_leaves(single)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
