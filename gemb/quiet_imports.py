"""TensorFlow's start-up noise, hidden unless GEMB_VERBOSE=1.

Importing TensorFlow prints lines like "Could not find cuda drivers on your machine" and CPU
feature notices from its native libraries, before absl's logging is initialised, so neither
TF_CPP_MIN_LOG_LEVEL nor Python's logging can silence them. gemb imports TensorFlow only on
its data paths (seqio, tfds), and there these lines say nothing a user can act on.

`install()` (called by gemb/__init__.py) puts a finder on sys.meta_path that runs the first
`import tensorflow`, wherever it happens (seqio, tfds, a test), with file descriptor 2 sent to
a temporary file. If the import fails, whatever it printed is written to stderr before the
exception propagates, so nothing that explains a failure is lost. TF_CPP_MIN_LOG_LEVEL=2 also
keeps TF's later INFO/WARNING lines quiet; a value already in the environment wins.

GEMB_VERBOSE=1 turns all of this off.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import sys
import tempfile

_SILENCED_MODULES = ("tensorflow",)


def verbose() -> bool:
    return os.environ.get("GEMB_VERBOSE", "").lower() in ("1", "true", "yes")


@contextlib.contextmanager
def native_stderr_captured():
    """Sends fd 2 to a temporary file for the block; replays it to stderr if the block raises."""
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
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode("utf-8", "replace"))
            sys.stderr.flush()
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with native_stderr_captured():
            self._loader.exec_module(module)

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self._loader, name)


class _QuietFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _SILENCED_MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _QuietLoader(spec.loader)
        return spec


def install() -> None:
    if verbose():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not any(isinstance(finder, _QuietFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())
