"""An offline (docstring -> code) retrieval corpus mined from installed Python packages.

Every machine that runs gemb has the packages gemb itself depends on, so this corpus needs no
network and no download: it is the embedded default for the quickstart. Each pair is

  query    = the first paragraph of a function's docstring (whitespace collapsed)
  positive = the function's source (decorators and signature included) with the docstring removed

Which sources: by default a fixed list of distributions at the exact versions setup.py pins
(PINNED_DISTRIBUTIONS; a test keeps the two in step), read through their installed file lists
(RECORD). Which other packages happen to be installed, or which Python patch release runs it,
does not change the corpus, so a fresh install builds the same files and the quickstart prints
the same figures everywhere. A pinned distribution installed at another version is mined with a
warning, and the manifest says so. `MiningConfig(roots=...)` mines folders instead;
`installed_roots()` gives the standard library and every site-packages folder (a bigger
corpus that depends on the machine).

How the corpus stays honest and reproducible:
- Splits are by module, decided by a hash of the module's *canonical* name (vendored copies such
  as ``pip._vendor.packaging.version`` count as ``packaging.version``), so a module is in the same
  split on every machine, and adding a source never moves an existing module between splits.
- Exact duplicates are removed: a code body or a query that appears in training never appears in
  validation or test, and each split keeps one pair per query and per code body.
- Output is deterministic: files are visited in sorted order and records are written in sorted
  order with sorted JSON keys, so two builds give byte-identical files.

The built files are cached under ``gemb.paths.cache_dir()/docstring_code/<key>/`` where the key
covers the mining rules and the (path, size, mtime) of every visited file.
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from gemb import paths

log = logging.getLogger(__name__)

# Bump when the mining rules change the output: it is part of the cache key.
CORPUS_VERSION = 2  # 2: mined from PINNED_DISTRIBUTIONS by default
SPLITS = ("train", "validation", "test")

# Path components that mark a vendored copy of another package: the canonical module name is
# what follows the last of them, so every copy of a module shares one split.
_VENDOR_MARKERS = frozenset(
    {"_vendor", "vendor", "_vendored", "vendored", "extern", "_extern", "third_party", "_thirdparty"}
)
# Folders never mined: tests mostly document assertions, not behaviour; the rest are not code
# that a user would search for.
_SKIPPED_DIR_NAMES = frozenset(
    {
        "__pycache__", "test", "tests", "testing", "idle_test", "unittests", "site-packages",
        "dist-packages", "examples", "benchmarks", "docs",
    }
)
_MODULE_PART = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# The quickstart corpus' sources: (distribution, version) exactly as setup.py pins them
# (tests/data/test_code_corpus.py checks that they agree). Well-documented libraries gemb
# installs anyway; each is capped at MiningConfig.max_bytes_per_package of source.
PINNED_DISTRIBUTIONS = (
    ("flax", "0.12.8"),
    ("gin-config", "0.5.0"),
    ("gguf", "0.19.0"),
    ("jax", "0.10.2"),
    ("numpy", "2.4.6"),
    ("optax", "0.2.8"),
    ("orbax-checkpoint", "0.12.8"),
    ("scikit-learn", "1.9.1"),
    ("scipy", "1.17.1"),
    ("seqio", "0.0.20"),
    ("tensorboard", "2.21.0"),
    ("tensorflow", "2.21.0"),
    ("tensorflow-datasets", "4.9.10"),
)


@dataclasses.dataclass(frozen=True)
class MiningConfig:
    """Rules for mining; every field is part of the cache key.

    distributions: (name, version) of the installed distributions to mine (their RECORD files).
    roots: (label, folder) pairs to mine instead, when given (e.g. installed_roots()).
    """

    distributions: tuple[tuple[str, str], ...] = PINNED_DISTRIBUTIONS
    roots: Optional[tuple[tuple[str, str], ...]] = None
    validation_fraction: float = 0.05
    test_fraction: float = 0.08
    # Huge files are nearly always generated code (op wrappers, unicode tables): slow to parse and
    # poor queries.
    max_file_bytes: int = 300_000
    # Bytes of source mined per top-level package. A few huge packages (tensorflow, scipy;
    # transformers and torch when mining installed_roots()) would otherwise dominate the corpus
    # and make the build slow; within a package, files are taken in the order of a hash of
    # their module name, so the choice does not depend on which other packages are installed.
    max_bytes_per_package: int = 4_000_000
    min_query_chars: int = 20
    min_query_words: int = 3
    max_query_chars: int = 1000
    min_code_lines: int = 2  # lines of body after the docstring is removed
    max_code_chars: int = 6000
    num_workers: int = 2


def installed_roots() -> tuple[tuple[str, str], ...]:
    """The standard library and every site-packages folder of this interpreter, deduplicated."""
    roots = []
    seen = set()
    for label, key in (("stdlib", "stdlib"), ("site-packages", "purelib"), ("site-packages", "platlib")):
        folder = sysconfig.get_paths().get(key)
        if folder and os.path.isdir(folder):
            real = os.path.realpath(folder)
            if real not in seen:
                seen.add(real)
                roots.append((label, folder))
    return tuple(roots)


def canonical_module(module: str) -> str:
    """The module name with any vendoring prefix removed (the unit of the split)."""
    parts = module.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in _VENDOR_MARKERS and i + 1 < len(parts):
            return ".".join(parts[i + 1 :])
    return module


def split_of_module(module: str, validation_fraction: float, test_fraction: float) -> str:
    """Which split a module belongs to: a pure function of its canonical name."""
    digest = _module_hash(module, b"gemb-docstring-code-split:")
    unit = int.from_bytes(digest[:8], "big") / 2**64
    if unit < test_fraction:
        return "test"
    if unit < test_fraction + validation_fraction:
        return "validation"
    return "train"


def _module_hash(module: str, salt: bytes) -> bytes:
    return hashlib.sha256(salt + canonical_module(module).encode()).digest()


def _module_name(parts: Sequence[str]) -> Optional[str]:
    """"a.b.c" for the path parts ("a", "b", "c.py"); None for files that are not mined."""
    *folders, name = parts
    stem = name[:-3]
    if (not name.endswith(".py") or not _MODULE_PART.match(stem) or stem.startswith("test_")
            or stem.endswith("_test")):
        return None
    if any(d in _SKIPPED_DIR_NAMES or not _MODULE_PART.match(d) for d in folders):
        return None
    return ".".join(list(folders) + ([] if stem == "__init__" else [stem])) or None


def _root_files(roots: Sequence[tuple[str, str]]) -> Iterator[tuple[str, str, str]]:
    """(module, label, path) of the .py files under folders, in a fixed order."""
    for label, root in roots:
        root = os.path.realpath(root)
        for folder, dirs, files in os.walk(root):
            # Sorting in place makes os.walk visit folders in a fixed order.
            dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIR_NAMES and _MODULE_PART.match(d))
            relative = os.path.relpath(folder, root)
            package = [] if relative == "." else relative.split(os.sep)
            for name in sorted(files):
                module = _module_name(package + [name])
                if module:
                    yield module, label, os.path.join(folder, name)


def installed_versions(distributions: Sequence[tuple[str, str]]) -> dict[str, str]:
    """{name: installed version}; a distribution that is not installed is an error."""
    from importlib import metadata

    out = {}
    for name, version in distributions:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise FileNotFoundError(
                f"the docstring->code corpus mines {name}=={version}, which is not installed; "
                f"pip install {name}=={version} (setup.py pins it).") from None
    return out


def _distribution_files(distributions: Sequence[tuple[str, str]]) -> Iterator[tuple[str, str, str]]:
    """(module, label, path) of the .py files the distributions installed (their RECORD)."""
    from importlib import metadata

    versions = installed_versions(distributions)
    for name, pinned in distributions:
        if versions[name] != pinned:
            log.warning("%s is installed at %s, not the pinned %s: the docstring->code corpus "
                        "(and the quickstart's figures) will differ from the README's.", name,
                        versions[name], pinned)
        distribution = metadata.distribution(name)
        label = f"{name}=={versions[name]}"
        for relative in sorted(distribution.files or [], key=str):
            parts = relative.parts
            if ".." in parts or not parts:
                continue  # scripts and data installed outside site-packages
            module = _module_name(parts)
            if module:
                yield module, label, str(distribution.locate_file(relative))


def list_module_files(config: "MiningConfig") -> list[tuple[str, str, str]]:
    """Sorted (module name, source label, file path) of the .py files to mine."""
    candidates = (_root_files(config.roots) if config.roots is not None
                  else _distribution_files(config.distributions))
    found: dict[str, tuple[str, str, str, int]] = {}
    for module, label, path in candidates:
        try:
            size = os.path.getsize(path)
        except OSError:
            continue
        if size > config.max_file_bytes:
            continue
        if module not in found:  # the first source wins, as on sys.path
            found[module] = (module, label, path, size)
    if config.max_bytes_per_package is not None:
        by_package: dict[str, list[tuple[str, str, str, int]]] = {}
        for entry in found.values():
            by_package.setdefault(entry[0].split(".")[0], []).append(entry)
        found = {}
        for entries in by_package.values():
            used = 0
            for entry in sorted(entries, key=lambda e: _module_hash(e[0], b"gemb-docstring-code-budget:")):
                if used + entry[3] > config.max_bytes_per_package and used > 0:
                    continue
                used += entry[3]
                found[entry[0]] = entry
    return [found[m][:3] for m in sorted(found)]


def _first_paragraph(docstring: str) -> str:
    cleaned = inspect.cleandoc(docstring)
    paragraph = re.split(r"\n\s*\n", cleaned, maxsplit=1)[0]
    return " ".join(paragraph.split())


def _code_without_docstring(lines: list[str], node: ast.AST) -> Optional[str]:
    """The function's source lines with the docstring statement cut out, dedented."""
    doc_stmt = node.body[0]
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    # A docstring on the same line as the signature (def f(): "doc") cannot be cut cleanly.
    if doc_stmt.lineno <= node.lineno or doc_stmt.end_lineno is None or node.end_lineno is None:
        return None
    if len(node.body) < 2 or node.body[1].lineno <= doc_stmt.end_lineno:
        return None
    tail = lines[doc_stmt.end_lineno : node.end_lineno]
    # Blank lines that separated the docstring from the body would start the body with a gap.
    while tail and not tail[0].strip():
        tail = tail[1:]
    kept = lines[start - 1 : doc_stmt.lineno - 1] + tail
    return textwrap.dedent("".join(kept)).strip("\n")


def mine_file(module: str, label: str, path: str, config: MiningConfig) -> list[dict]:
    """All (docstring, code) records of one file, in source order; [] if it cannot be parsed."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        source = raw.decode("utf-8")
        tree = ast.parse(source, filename=path)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    lines = source.splitlines(keepends=True)
    records = []
    # An explicit stack (instead of ast.walk) so each function gets its qualified name.
    stack: list[tuple[ast.AST, str]] = [(tree, "")]
    while stack:
        parent, prefix = stack.pop()
        for node in ast.iter_child_nodes(parent):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qualname = f"{prefix}{node.name}"
                stack.append((node, qualname + "."))
                if isinstance(node, ast.ClassDef):
                    continue
                docstring = ast.get_docstring(node, clean=False)
                if not docstring:
                    continue
                query = _first_paragraph(docstring)
                if (
                    len(query) < config.min_query_chars
                    or len(query) > config.max_query_chars
                    or len(query.split()) < config.min_query_words
                ):
                    continue
                code = _code_without_docstring(lines, node)
                if code is None or len(code) > config.max_code_chars:
                    continue
                body_lines = [l for l in code.splitlines()[1:] if l.strip() and not l.lstrip().startswith("#")]
                if len(body_lines) < config.min_code_lines:
                    continue
                records.append(
                    {
                        "query": query,
                        "code": code,
                        "module": module,
                        "qualname": qualname,
                        "lineno": node.lineno,
                        "root": label,
                    }
                )
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                # Functions defined under `if TYPE_CHECKING:` / `try: import ...` blocks.
                stack.append((node, prefix))
    records.sort(key=lambda r: r["lineno"])
    return records


def _mine_chunk(args: tuple[list[tuple[str, str, str]], MiningConfig]) -> list[list[dict]]:
    files, config = args
    return [mine_file(module, label, path, config) for module, label, path in files]


def _mine_all(files: list[tuple[str, str, str]], config: MiningConfig) -> Iterator[list[dict]]:
    """Per-file records in the order of `files`, mined in worker processes when allowed."""
    chunk = 64
    chunks = [(files[i : i + chunk], config) for i in range(0, len(files), chunk)]
    if config.num_workers <= 1 or len(chunks) <= 1:
        for item in chunks:
            yield from _mine_chunk(item)
        return
    # fork keeps start-up cheap; the workers only run ast and never touch TF or jax state.
    import multiprocessing

    context = multiprocessing.get_context("fork") if sys.platform != "win32" else None
    with concurrent.futures.ProcessPoolExecutor(config.num_workers, mp_context=context) as pool:
        for result in pool.map(_mine_chunk, chunks):  # map keeps the input order
            yield from result


def _fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def _encodable(record: dict) -> bool:
    try:
        record["query"].encode("utf-8")
        record["code"].encode("utf-8")
        return True
    except UnicodeEncodeError:  # lone surrogates in string literals
        return False


def build_records(config: MiningConfig = MiningConfig()) -> tuple[dict[str, list[dict]], dict]:
    """Mines, splits and deduplicates; returns ({split: records}, stats). No files written."""
    files = list_module_files(config)
    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    mined = 0
    for records in _mine_all(files, config):
        for record in records:
            mined += 1
            if not _encodable(record):
                continue
            split = split_of_module(record["module"], config.validation_fraction, config.test_fraction)
            record["split_key"] = canonical_module(record["module"])
            by_split[split].append(record)

    # Deduplicate train first, then validation and test against everything kept before them, so a
    # query or code body seen in training never reappears in evaluation.
    seen_queries: set[str] = set()
    seen_code: set[str] = set()
    kept: dict[str, list[dict]] = {}
    dropped = {s: 0 for s in SPLITS}
    for split in SPLITS:
        # Sorting by canonical module first keeps vendored copies together, so which copy wins
        # does not depend on where the vendoring package sorts.
        ordered = sorted(by_split[split], key=lambda r: (r["split_key"], r["module"], r["lineno"], r["qualname"]))
        kept[split] = []
        for record in ordered:
            query_key = _fingerprint(record["query"].lower())
            code_key = _fingerprint(" ".join(record["code"].split()))
            if query_key in seen_queries or code_key in seen_code:
                dropped[split] += 1
                continue
            seen_queries.add(query_key)
            seen_code.add(code_key)
            del record["split_key"]
            kept[split].append(record)
    stats = {
        "files": len(files),
        "mined_pairs": mined,
        "duplicates_dropped": dropped,
        "pairs": {s: len(kept[s]) for s in SPLITS},
        "modules": {s: len({r["module"] for r in kept[s]}) for s in SPLITS},
    }
    return kept, stats


def _cache_key(config: MiningConfig, files: list[tuple[str, str, str]]) -> str:
    digest = hashlib.sha256()
    rules = dataclasses.asdict(config)
    del rules["num_workers"]  # how fast it is built does not change what is built
    digest.update(json.dumps({"version": CORPUS_VERSION, "config": rules}, sort_keys=True).encode())
    for module, label, path in files:
        try:
            st = os.stat(path)
            digest.update(f"{module}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            continue
    return digest.hexdigest()[:16]


def write_corpus(folder: Path, config: MiningConfig = MiningConfig()) -> dict:
    """Builds the corpus into `folder` ({split}.jsonl + manifest.json); returns the manifest."""
    start = time.perf_counter()
    records, stats = build_records(config)
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as handle:
            for record in records[split]:
                handle.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
    sources = ({"roots": [label for label, _ in config.roots]} if config.roots is not None else
               {"distributions": installed_versions(config.distributions),
                "matches_pins": installed_versions(config.distributions)
                == dict(config.distributions)})
    manifest = {
        "version": CORPUS_VERSION,
        "python": sys.version.split()[0],
        "config": dataclasses.asdict(config),
        "sources": sources,
        **stats,
        # Kept out of the jsonl files so that those stay byte-identical between builds.
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    with open(folder / "manifest.json", "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1, sort_keys=True)
        handle.write("\n")
    return manifest


def corpus_dir(config: MiningConfig = MiningConfig(), rebuild: bool = False) -> Path:
    """The cached corpus folder, built on first use (about a minute on 2 cores)."""
    files = list_module_files(config)
    base = paths.cache_dir() / "docstring_code"
    folder = base / f"v{CORPUS_VERSION}-{_cache_key(config, files)}"
    if (folder / "manifest.json").exists() and not rebuild:
        return folder
    base.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a crash or a concurrent builder never leaves a
    # half-written corpus where readers look.
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=base))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the cache is shared like any other
    try:
        manifest = _write_corpus_in_fresh_process(staging, config)
        if folder.exists():
            shutil.rmtree(folder)
        try:
            os.replace(staging, folder)
        except OSError:  # another process finished first; its output is identical
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("docstring->code corpus built in %s: %s", folder, manifest["pairs"])
    return folder


def _config_from_json(text: str) -> MiningConfig:
    fields = json.loads(text)
    for name in ("roots", "distributions"):
        if fields.get(name) is not None:
            fields[name] = tuple(tuple(pair) for pair in fields[name])
    return MiningConfig(**fields)


def _write_corpus_in_fresh_process(folder: Path, config: MiningConfig) -> dict:
    """write_corpus, run by a new interpreter when it uses worker processes.

    The workers are forked, and forking a process that already runs TensorFlow's or JAX's
    thread pools (as a training process does when it first asks for the corpus) can deadlock.
    """
    if config.num_workers <= 1:
        return write_corpus(folder, config)
    import_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([import_root] + [p for p in sys.path if p]))
    command = [sys.executable, "-m", "gemb.data.code_corpus", "--output", str(folder),
               "--config-json", json.dumps(dataclasses.asdict(config))]
    result = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the docstring->code corpus failed ({' '.join(command)}):\n{result.stderr[-3000:]}")
    return json.loads((folder / "manifest.json").read_text())


def read_split(split: str, config: MiningConfig = MiningConfig()) -> Iterable[dict]:
    """Records of one split (building the corpus if needed)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of the docstring->code corpus; use one of {SPLITS}")
    with open(corpus_dir(config) / f"{split}.jsonl", encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)


def main(argv: Optional[Sequence[str]] = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="write here instead of the cache folder")
    parser.add_argument("--workers", type=int, default=MiningConfig.num_workers)
    parser.add_argument("--installed", action="store_true",
                        help="mine the standard library and every site-packages folder instead "
                             "of the pinned distributions (bigger; depends on the machine)")
    parser.add_argument("--config-json", help="a MiningConfig as JSON (overrides the others)")
    args = parser.parse_args(argv)
    if args.config_json:
        config = _config_from_json(args.config_json)
    else:
        config = MiningConfig(num_workers=args.workers,
                              roots=installed_roots() if args.installed else None)
    if args.output:
        manifest = write_corpus(Path(args.output), config)
    else:
        folder = corpus_dir(config, rebuild=True)
        manifest = json.loads((folder / "manifest.json").read_text())
        print(folder)
    print(json.dumps(manifest, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
