"""bench/accelerator.py cannot rot: its suite runs on CPU at TINY sizes (no baseline) and
prints every field the comparison with the PyTorch baseline reads; importing it and running it
load no gin, seqio or TensorFlow (accelerator machines may lack them)."""

import json
import math
import subprocess
import sys

from gemb import paths

BENCH = paths.REPO_ROOT / "bench" / "accelerator.py"
TRAIN_FIELDS = ("step_s", "tokens_per_s", "pairs_per_s", "mfu", "peak_mem_gb", "compile_s")
INFER_FIELDS = ("fixed_128x512_tokens_per_s", "fixed_mfu", "lognormal_texts_per_s",
                "lognormal_tokens_per_s", "mean_len", "peak_mem_gb", "compile_s")


def test_tiny_suite_prints_finite_fields_of_every_mode():
    result = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--no-baseline", "--peak-flops", "1e12"],
        cwd=paths.REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [row["mode"] for row in rows] == ["train", "gradcache", "infer"]
    assert "gemb/torch" in result.stdout  # the ratio table's header
    for row in rows:
        gemb = row["gemb"]
        assert row["baseline"] == {"skipped": "--no-baseline"}
        fields = INFER_FIELDS if row["mode"] == "infer" else TRAIN_FIELDS
        for field in fields:
            assert isinstance(gemb[field], (int, float)) and math.isfinite(gemb[field]), (field, gemb)
            assert gemb[field] >= 0, (field, gemb)
        assert gemb["peak_flops"] == 1e12 and gemb["peak_source"] == "--peak-flops"
        assert gemb["loaded_gin_seqio_tensorflow"] == []
        if row["mode"] != "infer":
            assert gemb["loss_finite"] and gemb["flops_per_step"] > 0


def test_importing_the_bench_loads_no_gin_seqio_or_tensorflow():
    code = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='bench'); "
            "loaded = [m for m in ('gin', 'seqio', 'tensorflow') if m in sys.modules]; "
            "print(loaded); sys.exit(1 if loaded else 0)")
    result = subprocess.run([sys.executable, "-c", code, str(BENCH)], capture_output=True,
                            text=True, cwd=paths.REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
