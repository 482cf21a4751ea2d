"""gemb: Gemini-Embedding-style text embedding training in JAX/Flax."""

from gemb import paths as _paths  # noqa: F401  (chooses gs:// access before anything opens a path)
from gemb import quiet_imports as _quiet_imports

_quiet_imports.install()
