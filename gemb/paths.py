"""Where gemb finds things that live outside the repository."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_root() -> Path:
    """The folder of small real datasets (../shared/data beside a checkout).

    GEMB_SHARED_DATA overrides it, for installs that do not sit beside a checkout.
    """
    override = os.environ.get("GEMB_SHARED_DATA")
    if override:
        return Path(override)
    return REPO_ROOT.parent / "shared" / "data"


def cache_dir() -> Path:
    """Where converted models and built corpora are cached (GEMB_CACHE overrides)."""
    path = Path(os.environ.get("GEMB_CACHE", Path.home() / ".cache" / "gemb"))
    path.mkdir(parents=True, exist_ok=True)
    return path
