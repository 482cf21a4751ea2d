"""gemb: Gemini-Embedding-style text embedding training in JAX/Flax."""

from gemb import quiet_imports as _quiet_imports

_quiet_imports.install()
