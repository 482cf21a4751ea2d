"""Where gemb finds things, and the one path type for files a user names (local or gs://).

Every path a user can give (run directory, init_from, model folders, tokenizer files,
TensorBoard and eval output folders, export and soup outputs) goes through `as_path`: a
local path stays a pathlib.Path, a remote one (gs://, s3://) becomes an etils.epath.Path,
which offers pathlib's interface over fsspec. orbax uses epath as well, so checkpoints, model
folders and side files all travel the same way. `pathlib.Path("gs://bucket/run")` would
silently become the local folder `./gs:/bucket/run`; nothing in gemb may build one. The few
operations pathlib and epath spell differently are functions here (rmtree, files_under).
"""

import os
from pathlib import Path

# epath would pick tf.io.gfile for gs:// whenever TensorFlow is installed, and fsspec (gcsfs)
# otherwise. gemb picks gcsfs on every host, so a job behaves the same on hosts with and
# without TensorFlow (the training core runs without it), and a local GCS emulator works
# (gcsfs honours STORAGE_EMULATOR_HOST; TensorFlow's GCS client has no endpoint override).
# Set before epath decides (it caches the choice at the first remote path); a user's own
# EPATH_USE_TF wins.
os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # noqa: E402  (after the backend choice above)

REPO_ROOT = Path(__file__).resolve().parent.parent
REMOTE_SCHEMES = ("gs://", "s3://", "az://", "hf://")

PathLike = str | os.PathLike


def as_path(path: PathLike) -> Path | epath.Path:
    """A user's path: an epath.Path when remote, else a pathlib.Path."""
    return epath.Path(path) if is_remote(path) else Path(path)


def is_remote(path: PathLike) -> bool:
    """Whether `path` names remote storage (gs://...), which has no local folder or disk."""
    return os.fspath(path).startswith(REMOTE_SCHEMES)


def absolute(path: PathLike) -> Path | epath.Path:
    """`path` made absolute (a remote path already is)."""
    path = as_path(path)
    return path if is_remote(path) else path.absolute()


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


def local_copy(path: PathLike, siblings: tuple[str, ...] = ()) -> Path:
    """A local file with the content of `path`: `path` itself when local; for a remote file a
    fresh copy in the cache (for small files a library opens only by local name, like a
    tokenizer model), with the named `siblings` beside it when they exist."""
    if not is_remote(path):
        return Path(path)
    import hashlib
    import tempfile

    remote = as_path(path)
    folder = cache_dir() / "remote" / hashlib.sha256(os.fspath(remote.parent).encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    for name in (remote.name, *siblings):
        source = remote.parent / name
        if name != remote.name and not source.exists():
            continue
        # Written beside, then renamed: a reader in another process never sees half a file.
        with tempfile.NamedTemporaryFile(dir=folder, delete=False) as staging:
            staging.write(source.read_bytes())
        os.replace(staging.name, folder / name)
    return folder / remote.name


def rmtree(folder: PathLike) -> None:
    """Deletes a folder and everything in it (on object storage: every object under it)."""
    if is_remote(folder):
        as_path(folder).rmtree()
    else:
        import shutil

        shutil.rmtree(folder)


def files_under(folder: PathLike) -> list[Path | epath.Path]:
    """Every file below `folder`, sorted (epath refuses `rglob` on object storage)."""
    folder = as_path(folder)
    if not is_remote(folder):
        return sorted(path for path in folder.rglob("*") if path.is_file())
    # fsspec's walk names remote folders without their scheme ("bucket/run"): put it back.
    scheme = os.fspath(folder).split("://")[0] + "://"
    files = []
    for root, _, names in folder.walk():
        root = os.fspath(root)
        if not root.startswith(scheme):
            root = scheme + root
        files += [as_path(root) / name for name in names]
    return sorted(files)
