"""seqio vocabularies: Gemma 3's rebuilt SentencePiece model, and the tokenizer.json adapter.

seqio vocabularies add no BOS: vocab.encode(text) == Tokenizer.encode(text, add_bos=False), and the
feature converter prepends BOS. These tests hold both the Python and the TF paths (tf_text's
SentencePiece op, or tf.numpy_function for tokenizer.json) to gemb.tokenizer.Tokenizer's ids.
"""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from gemb.checkpoints import gguf_tokenizer
from gemb.data.vocab import TokenizerJsonVocabulary, gemma3_vocabulary
from gemb.tokenizer import Tokenizer

# Scripts, code, whitespace runs (incl. past the longest whitespace piece), digits, bytes that
# need byte fallback, and special tokens' text.
TEXTS = [
    "",
    "Hello, World!",
    "Café crème brûlée, naïve façade, Straße",
    "Привет, мир! Καλημέρα κόσμε",
    "مرحبا بالعالم  שלום עולם",
    "नमस्ते दुनिया १२३",
    "你好，世界 日本語のテキスト 안녕하세요 세계",
    "สวัสดีชาวโลก 🙂 👩‍💻 🇫🇷 🫩",
    "def f(x):\n    return x ** 2\n\n\n",
    "for i in range(10):\n\tprint(i)",
    "   leading and trailing   ",
    "a" + " " * 40 + "b",
    "\t\t\ttabs\n\n\nnewlines\r\n",
    "3.14159 2024-01-01 1,000,000 007",
    "\x00\x07\x1b[0m\ufeff\u200b\U000e0001\U00010348\ue000",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<unused0> <mask> [multimodal] <table></table>",
    "<bos> and <eos> are plain text here",
]
ROLE_TOKEN_TEXTS = ("<bos>", "<eos>", "<pad>", "<unk>")
TEXTS_WITHOUT_ROLE_TOKENS = [t for t in TEXTS if not any(r in t for r in ROLE_TOKEN_TEXTS)]


@pytest.fixture(scope="module")
def gemma3_model_file(gemma3_270m_gguf, tmp_path_factory):
    target = tmp_path_factory.mktemp("gemma3") / "tokenizer.model"
    return gguf_tokenizer.write_sentencepiece_model(gemma3_270m_gguf, target)


@pytest.fixture(scope="module")
def gemma3_vocab(gemma3_model_file):
    return gemma3_vocabulary(gemma3_model_file)


@pytest.fixture(scope="module")
def gemma3_tokenizer(gemma3_model_file):
    return Tokenizer(gemma3_model_file)


# ---------------------------------------------------------------- Gemma 3 SentencePiece


def test_gemma3_vocabulary_ids(gemma3_vocab):
    assert gemma3_vocab.vocab_size == 262144
    vocab = gemma3_vocab
    assert (vocab.pad_id, vocab.eos_id, vocab.bos_id, vocab.unk_id) == (0, 1, 2, 3)


def test_gemma3_vocabulary_encodes_like_tokenizer_in_python_and_tf(gemma3_vocab, gemma3_tokenizer):
    expected = gemma3_tokenizer.encode_batch(TEXTS, add_bos=False)
    assert [gemma3_vocab.encode(t) for t in TEXTS] == expected
    assert [gemma3_vocab.encode_tf(tf.constant(t)).numpy().tolist() for t in TEXTS] == expected
    # Inside tf.data, as a seqio task's tokenize step runs it (graph mode).
    dataset = tf.data.Dataset.from_tensor_slices(TEXTS).map(gemma3_vocab.encode_tf)
    assert [ids.tolist() for ids in dataset.as_numpy_iterator()] == expected
    # No BOS from seqio: the feature converter prepends it.
    assert gemma3_vocab.encode("x")[0] != gemma3_vocab.bos_id


def test_gemma3_vocabulary_on_mixed_texts(gemma3_vocab, gemma3_tokenizer):
    # Every ordered pair of TEXTS, joined by varying separators: scripts, code and runs meet.
    separators = ["", " ", "  ", "\n", "\t"]
    mixed = [
        a + separators[(i + j) % len(separators)] + b
        for i, a in enumerate(TEXTS)
        for j, b in enumerate(TEXTS)
    ]
    expected = gemma3_tokenizer.encode_batch(mixed, add_bos=False)
    assert [gemma3_vocab.encode(t) for t in mixed] == expected
    dataset = tf.data.Dataset.from_tensor_slices(mixed).map(gemma3_vocab.encode_tf)
    assert [ids.tolist() for ids in dataset.as_numpy_iterator()] == expected


def test_gemma3_vocabulary_decodes_in_python_and_tf(gemma3_vocab, gemma3_tokenizer):
    texts = [t for t in TEXTS if t]
    batch = gemma3_tokenizer.encode_batch(texts, add_bos=False)
    for text, ids in zip(texts, batch):
        assert gemma3_vocab.decode(ids) == text
        assert gemma3_vocab.decode_tf(tf.constant(ids, tf.int32)).numpy().decode("utf-8") == text
    # seqio cuts at EOS; padded rows decode to their text.
    width = max(map(len, batch)) + 3
    padded = np.zeros((len(batch), width), np.int32)
    for row, ids in enumerate(batch):
        padded[row, : len(ids)] = ids
        padded[row, len(ids)] = gemma3_vocab.eos_id
    decoded = gemma3_vocab.decode_tf(tf.constant(padded)).numpy()
    assert [d.decode("utf-8") for d in decoded] == texts


def test_gemma3_vocabulary_errors(gemma3_270m_gguf, tmp_path):
    with pytest.raises(ValueError, match="write_sentencepiece_model"):
        gemma3_vocabulary(gemma3_270m_gguf)
    with pytest.raises(FileNotFoundError, match="missing.model does not exist"):
        gemma3_vocabulary(tmp_path / "missing.model")


# ---------------------------------------------------------------- tokenizer.json adapter

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # pad first: seqio reads id 0 as padding
TRAINING_TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a tokenizer turns text into ids and back",
    "Zoë's café: naïve façade, 3.14 and 42",
    "Привет мир, καλημέρα",
]


def write_small_tokenizer_json(folder: Path, specials=SPECIALS) -> Path:
    """A byte-level BPE trained on four strings: every text encodes, and decoding is exact."""
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = HfTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TRAINING_TEXTS, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def small_tokenizer_json(tmp_path_factory):
    return write_small_tokenizer_json(tmp_path_factory.mktemp("small_tokenizer"))


def test_tokenizer_json_through_gemb_tokenizer(small_tokenizer_json):
    from tokenizers import Tokenizer as HfTokenizer

    tokenizer = Tokenizer(small_tokenizer_json)
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    reference = HfTokenizer.from_file(str(small_tokenizer_json))
    for text in TEXTS_WITHOUT_ROLE_TOKENS:
        ids = tokenizer.encode(text)
        assert ids == [2, *reference.encode(text, add_special_tokens=False).ids]
        assert tokenizer.decode(ids) == text
    # A tokenizer.json matches its special tokens in text (the SentencePiece model does not), and
    # decode drops BOS/EOS/PAD ids: the difference gemb.tokenizer's docstring describes.
    ids = tokenizer.encode("x<eos>", add_bos=False)
    assert ids[-1] == tokenizer.eos_id and tokenizer.decode(ids) == "x"
    assert Tokenizer.from_dir(small_tokenizer_json.parent).encode("fox") == tokenizer.encode("fox")


def test_tokenizer_json_vocabulary_in_python_and_tf(small_tokenizer_json):
    vocab = TokenizerJsonVocabulary(small_tokenizer_json)
    tokenizer = Tokenizer(small_tokenizer_json)
    assert (vocab.pad_id, vocab.eos_id, vocab.bos_id, vocab.unk_id) == (0, 1, 2, 3)
    assert vocab.vocab_size == tokenizer.vocab_size
    texts = TEXTS_WITHOUT_ROLE_TOKENS
    expected = tokenizer.encode_batch(texts, add_bos=False)

    assert [vocab.encode(t) for t in texts] == expected
    assert [vocab.encode_tf(tf.constant(t)).numpy().tolist() for t in texts] == expected
    assert vocab.encode_tf(tf.constant(texts)).to_list() == expected  # a batch gives ragged ids
    dataset = tf.data.Dataset.from_tensor_slices(texts).map(vocab.encode_tf)
    assert dataset.element_spec.shape.as_list() == [None]
    assert [ids.tolist() for ids in dataset.as_numpy_iterator()] == expected

    for text, ids in zip(texts, expected):
        assert vocab.decode(ids) == text
        assert vocab.decode_tf(tf.constant(ids, tf.int32)).numpy().decode("utf-8") == text
    padded = tf.ragged.constant(expected, dtype=tf.int32).to_tensor()  # pads with 0
    assert [t.decode("utf-8") for t in vocab.decode_tf(padded).numpy()] == texts
    # seqio's decode stops at EOS.
    assert vocab.decode(expected[1] + [vocab.eos_id] + expected[2]) == texts[1]

    # Gin deep-copies configurables: the vocabulary must survive a pickle round trip.
    copied = pickle.loads(pickle.dumps(vocab))
    assert copied == vocab and copied.encode("fox") == vocab.encode("fox")


def test_tokenizer_json_special_names_from_tokenizer_config(tmp_path):
    path = write_small_tokenizer_json(tmp_path, specials=["<pad>", "<s>", "</s>", "<unk>"])
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"})
    )
    tokenizer = Tokenizer(path)
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert tokenizer.encode("fox")[0] == 1


def test_tokenizer_json_vocabulary_rejects_padding_not_at_zero(tmp_path):
    path = write_small_tokenizer_json(tmp_path, specials=["<eos>", "<pad>", "<bos>", "<unk>"])
    with pytest.raises(ValueError, match=r"padding token has id 1.*seqio reads id 0"):
        TokenizerJsonVocabulary(path)


def test_tokenizer_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TokenizerJsonVocabulary(tmp_path / "tokenizer.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"model": 1}')
    with pytest.raises(ValueError, match="not a loadable tokenizer.json"):
        TokenizerJsonVocabulary(broken)
