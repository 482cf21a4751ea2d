"""TensorFlow / CUDA / SentencePiece start-up noise is hidden by default (GEMB_VERBOSE=1 shows
it), and nothing else written to stderr is lost."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gemb import quiet_imports

# Importing TF and seqio, then running one TF op (which probes for CUDA): the start-up path of
# every gemb command that reads data.
TF_START = ("import gemb, seqio, tensorflow as tf; tf.constant(1) + 1; "
            "print('gpus visible to TF:', tf.config.get_visible_devices('GPU'))")


def _run(code, **env):
    environment = {k: v for k, v in os.environ.items() if k not in ("GEMB_VERBOSE",
                                                                     "TF_CPP_MIN_LOG_LEVEL")}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environment, timeout=300)


@pytest.mark.slow
def test_tensorflow_start_is_silent_and_uses_no_gpu():
    quiet = _run(TF_START)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    assert "gpus visible to TF: []" in quiet.stdout
    loud = _run(TF_START, GEMB_VERBOSE="1")
    assert loud.returncode == 0, loud.stderr
    # What is hidden is there (on a CPU machine: no CUDA drivers, CPU feature notices).
    assert any(quiet_imports.is_noise(line) for line in loud.stderr.splitlines()), loud.stderr


def test_filter_drops_only_known_noise(capfd):
    with quiet_imports.native_stderr_filtered():
        os.write(2, b"normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty. use identity "
                    b"normalization.\n")
        os.write(2, b"a real warning from a native library\n")
        print("a Python warning", file=sys.stderr)
    err = capfd.readouterr().err
    assert "precompiled_charsmap" not in err
    assert "a real warning from a native library\n" in err and "a Python warning\n" in err


def test_filter_keeps_output_when_the_block_fails(capfd):
    with pytest.raises(RuntimeError):
        with quiet_imports.native_stderr_filtered():
            os.write(2, b"what the failure printed\n")
            raise RuntimeError("boom")
    assert "what the failure printed" in capfd.readouterr().err


def test_verbose_turns_the_filter_off(capfd, monkeypatch):
    monkeypatch.setenv("GEMB_VERBOSE", "1")
    with quiet_imports.native_stderr_filtered():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are "
                    b"written to STDERR\n")
    assert "absl::InitializeLog" in capfd.readouterr().err


def test_a_gemma_data_pipeline_starts_silently(gemma3_270m_model_dir, capfd):
    """seqio + tf.data + tf_text's SentencePiece op on the real Gemma tokenizer: their start-up
    lines (cuInit, precompiled_charsmap) do not reach stderr."""
    from gemb.data import batching, feature_converter, mixtures, vocab

    vocabulary = vocab.gemma3_vocabulary(Path(gemma3_270m_model_dir) / "tokenizer.model")
    mixture = mixtures.build_mixture(vocabulary, name="gemb_quickstart")
    converter = feature_converter.FeatureConverter(feature_converter.FeatureConverterConfig(
        query_length=16, document_length=32))
    batcher = batching.TaskHomogeneousBatcher(mixture, batch_size=4, converter=converter)
    capfd.readouterr()
    features = next(batcher)
    assert features["query_tokens"].shape[0] == 4
    err = capfd.readouterr().err
    assert "precompiled_charsmap" not in err and "cuInit" not in err, err
