"""Start-up noise of TensorFlow, CUDA probing and SentencePiece, hidden unless GEMB_VERBOSE=1.

gemb runs TensorFlow only to feed data (seqio, tf.data). Its native libraries print lines that
say nothing a gemb user can act on: "Could not find cuda drivers on your machine" and CPU
feature notices while `import tensorflow` runs (before absl's logging is initialised, so
TF_CPP_MIN_LOG_LEVEL cannot silence them), "failed call to cuInit" when TensorFlow first looks
for GPUs, and SentencePiece's "precompiled_charsmap is empty" each time a tf.data pipeline first
builds a Gemma tokenizer.

`native_stderr_filtered()` runs a block with file descriptor 2 sent to a temporary file, then
writes back to stderr every line that is not one of those known lines (KNOWN_NOISE): anything
else, a real error included, is kept, only delayed to the end of the block. It is used around:

* the first `import tensorflow`, wherever it happens (seqio, tfds, a test): `install()`, called
  by gemb/__init__.py, puts a finder on sys.meta_path for it. Inside the same block TensorFlow
  is told to use no GPU, as t5x does: it only feeds data, and on a GPU host it would otherwise
  take GPU memory that JAX needs;
* a data pipeline's start (gemb.data.batching).

GEMB_VERBOSE=1 turns all of this off.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile

KNOWN_NOISE = tuple(re.compile(pattern) for pattern in (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$",
    r"cudart_stub\.cc.*Could not find cuda drivers",
    r"cuda_platform\.cc.*failed call to cuInit",
    r"cpu_feature_guard\.cc.*This TensorFlow binary is optimized",
    r"^To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler",
    r"oneDNN custom operations are on",
    r"normalizer\.cc.*precompiled_charsmap is empty\. use identity normalization\.",
))


def verbose() -> bool:
    return os.environ.get("GEMB_VERBOSE", "").lower() in ("1", "true", "yes")


def is_noise(line: str) -> bool:
    return any(pattern.search(line) for pattern in KNOWN_NOISE)


@contextlib.contextmanager
def native_stderr_filtered():
    """Runs the block with fd 2 captured, then writes back every line that is not KNOWN_NOISE."""
    if verbose():
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (an embedded interpreter): nothing to hide
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode("utf-8", "replace").splitlines(True)
                    if not is_noise(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with native_stderr_filtered():
            self._loader.exec_module(module)
            try:
                module.config.set_visible_devices([], "GPU")
            except (AttributeError, RuntimeError, ValueError):
                pass  # a TF without GPU support, or devices already initialised: nothing to hide

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self._loader, name)


class _QuietFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _QuietLoader(spec.loader)
        return spec


def install() -> None:
    if verbose() or "tensorflow" in sys.modules:
        return
    if not any(isinstance(finder, _QuietFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())
