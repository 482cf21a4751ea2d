import hashlib
import json
import os
import re
import sysconfig

import pytest

from gemb import paths
from gemb.data import code_corpus
from gemb.data.code_corpus import MiningConfig

FUNCTION = '''
import functools


@functools.lru_cache
def {name}(values, key=None):
    """Return the {what} of the values, ignoring missing entries.

    More detail that is not part of the query.
    """

    kept = [v for v in values if v is not None]
    return sorted(kept, key=key)


class Holder:
    def method_{name}(self, item):
        """Store one item in the holder for later use."""
        self.items.append(item)
        return len(self.items)

    def undocumented(self):
        return 1

    def short_doc(self):
        """Tiny."""
        return 2
'''


def _write_package(root, module_path, name, what):
    path = root.joinpath(*module_path.split(".")).with_suffix(".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    for parent in path.parents:
        if parent == root:
            break
        (parent / "__init__.py").touch()
    path.write_text(FUNCTION.format(name=name, what=what))


@pytest.fixture
def fake_site(tmp_path):
    root = tmp_path / "site"
    for i in range(40):
        _write_package(root, f"pkg{i}.mod", f"func{i}", f"sorted copy number {i}")
    # A vendored copy of pkg0.mod, and a test module that must be skipped.
    _write_package(root, "big._vendor.pkg0.mod", "func0", "sorted copy number 0")
    _write_package(root, "pkg1.tests.test_mod", "skipped", "never mined")
    (root / "broken.py").write_text("def f(:\n")
    return root


def _config(root, num_workers=1):
    return MiningConfig(roots=(("site-packages", str(root)),), validation_fraction=0.2, test_fraction=0.2,
                        num_workers=num_workers)


def test_mining_rules(fake_site):
    records = code_corpus.mine_file("pkg3.mod", "site-packages", str(fake_site / "pkg3" / "mod.py"), _config(fake_site))
    assert [r["qualname"] for r in records] == ["func3", "Holder.method_func3"]
    first = records[0]
    assert first["query"] == "Return the sorted copy number 3 of the values, ignoring missing entries."
    assert first["code"].startswith("@functools.lru_cache\ndef func3(values, key=None):\n    kept = [")
    assert '"""' not in first["code"] and "More detail" not in first["code"]
    assert records[1]["code"].startswith("def method_func3(self, item):\n    self.items")  # dedented


def test_splits_are_by_module_deduplicated_and_deterministic(fake_site, tmp_path):
    config = _config(fake_site)
    first = code_corpus.write_corpus(tmp_path / "one", config)
    second = code_corpus.write_corpus(tmp_path / "two", config)
    for split in code_corpus.SPLITS:
        assert (tmp_path / "one" / f"{split}.jsonl").read_bytes() == (tmp_path / "two" / f"{split}.jsonl").read_bytes()
    assert first["pairs"] == second["pairs"]
    by_split = {s: [json.loads(l) for l in open(tmp_path / "one" / f"{s}.jsonl")] for s in code_corpus.SPLITS}
    modules = {s: {r["module"] for r in rs} for s, rs in by_split.items()}
    assert not modules["train"] & modules["test"] and not modules["train"] & modules["validation"]
    for split, records in by_split.items():
        for record in records:
            assert code_corpus.split_of_module(record["module"], 0.2, 0.2) == split
    everything = [r for rs in by_split.values() for r in rs]
    # The vendored copy is a duplicate of pkg0.mod (same split, same code): kept once.
    assert sum(r["qualname"] == "func0" for r in everything) == 1
    assert not any("tests" in r["module"] or r["module"] == "broken" for r in everything)
    assert len({r["query"] for r in everything}) == len(everything)
    assert first["pairs"]["train"] > 0 and first["pairs"]["test"] > 0


def test_split_ignores_vendoring_and_other_modules():
    assert code_corpus.canonical_module("pip._vendor.packaging.version") == "packaging.version"
    assert code_corpus.canonical_module("setuptools.extern.x") == "x"
    split = code_corpus.split_of_module("packaging.version", 0.05, 0.08)
    assert code_corpus.split_of_module("pip._vendor.packaging.version", 0.05, 0.08) == split


def test_cached_build_is_reused(fake_site, tmp_path, monkeypatch):
    monkeypatch.setenv("GEMB_CACHE", str(tmp_path / "cache"))
    config = _config(fake_site, num_workers=2)  # built by a fresh interpreter with 2 workers
    folder = code_corpus.corpus_dir(config)
    stamp = (folder / "train.jsonl").stat().st_mtime_ns
    assert code_corpus.corpus_dir(config) == folder and (folder / "train.jsonl").stat().st_mtime_ns == stamp
    assert len(list(code_corpus.read_split("train", config))) == json.loads((folder / "manifest.json").read_text())["pairs"]["train"]
    with pytest.raises(ValueError, match="unknown split"):
        list(code_corpus.read_split("dev", config))
    # The number of workers is not part of the cache key: one process finds the same files.
    assert code_corpus.corpus_dir(_config(fake_site, num_workers=1)) == folder


def test_real_stdlib_package_builds_identically_twice(tmp_path):
    email = os.path.join(sysconfig.get_paths()["stdlib"], "email")
    config = MiningConfig(roots=(("stdlib", email),), num_workers=1)
    code_corpus.write_corpus(tmp_path / "a", config)
    code_corpus.write_corpus(tmp_path / "b", config)
    for split in code_corpus.SPLITS:
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()


def _setup_py_pins():
    text = (paths.REPO_ROOT / "setup.py").read_text()
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', text))


def test_pinned_distributions_are_setup_pys_pins():
    """The quickstart corpus is only reproducible if its sources are exactly what gemb installs."""
    pins = _setup_py_pins()
    for name, version in code_corpus.PINNED_DISTRIBUTIONS:
        assert pins.get(name) == version, f"{name}: corpus mines {version}, setup.py pins {pins.get(name)}"
    constraints = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$",
                                  (paths.REPO_ROOT / "constraints.txt").read_text(), re.M))
    lowered = {k.lower().replace("_", "-"): v for k, v in constraints.items()}
    for name, version in pins.items():
        assert lowered.get(name.lower()) == version, f"constraints.txt disagrees with setup.py on {name}"


def test_a_pinned_distribution_is_mined_from_its_record(tmp_path):
    config = MiningConfig(distributions=(("gin-config", "0.5.0"),), num_workers=1)
    files = code_corpus.list_module_files(config)
    assert files and all(label == "gin-config==0.5.0" for _, label, _ in files)
    assert all(module.split(".")[0] == "gin" for module, _, _ in files)
    assert "gin.config" in {module for module, _, _ in files}
    manifest = code_corpus.write_corpus(tmp_path / "gin", config)
    assert manifest["sources"] == {"distributions": {"gin-config": "0.5.0"}, "matches_pins": True}
    with pytest.raises(FileNotFoundError, match="pip install no-such-dist==1.0"):
        code_corpus.list_module_files(MiningConfig(distributions=(("no-such-dist", "1.0"),)))


# What the pinned sources give: the same files on every machine that installs setup.py's pins
# (the README's quickstart figures were measured on this corpus). A change of a pin, of the
# mining rules or of PINNED_DISTRIBUTIONS changes it: rebuild, re-measure the README, update.
PINNED_CORPUS_SHA256 = "cd576777f61e7e845c318996d36dc1ceb8bacf97ab71712e18d2e60608f34e9f"


@pytest.mark.slow
def test_default_corpus_is_the_pinned_one_and_does_not_leak():
    """The default corpus: mined from the pinned distributions only, >= 8,000 train and >= 600
    test pairs, no test module or query in training, and byte for byte the pinned corpus."""
    folder = code_corpus.corpus_dir()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["sources"]["matches_pins"], manifest["sources"]
    assert manifest["pairs"]["train"] >= 8_000 and manifest["pairs"]["test"] >= 600
    train = [json.loads(l) for l in open(folder / "train.jsonl", encoding="utf-8")]
    test = [json.loads(l) for l in open(folder / "test.jsonl", encoding="utf-8")]
    assert len(train) == manifest["pairs"]["train"] and len(test) == manifest["pairs"]["test"]
    assert {r["root"] for r in train} <= {f"{n}=={v}" for n, v in code_corpus.PINNED_DISTRIBUTIONS}
    train_modules = {code_corpus.canonical_module(r["module"]) for r in train}
    assert not {code_corpus.canonical_module(r["module"]) for r in test} & train_modules
    train_queries = {r["query"].lower() for r in train}
    assert not any(r["query"].lower() in train_queries for r in test)
    digest = hashlib.sha256()
    for split in code_corpus.SPLITS:
        digest.update((folder / f"{split}.jsonl").read_bytes())
    assert digest.hexdigest() == PINNED_CORPUS_SHA256
