"""Small real checkpoints the tests write: a TINY-sized HF Gemma 3 folder and a tokenizer.json.

Imported by test modules as `tiny_checkpoints` (tests/ is on sys.path through its conftest).
"""

import json

import pytest

from gemb.models import config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = ["the", "a", "of", "code", "python", "function", "returns", "list", "capital", "france",
         "paris", "is", "what", "query", "text", "task", "title", "none", "|", ":", "search",
         "result", "retrieval", "sentence", "similarity", "classification", "clustering"]


def tiny_hf_config(**overrides):
    values = dict(
        vocab_size=config.TINY.vocab_size, hidden_size=config.TINY.embed_dim,
        intermediate_size=config.TINY.hidden_dim, num_hidden_layers=config.TINY.num_layers,
        num_attention_heads=config.TINY.num_heads, num_key_value_heads=config.TINY.num_kv_heads,
        head_dim=config.TINY.head_dim, sliding_window=config.TINY.sliding_window_size,
        query_pre_attn_scalar=int(config.TINY.query_pre_attn_scalar), max_position_embeddings=512,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
    )
    values.update(overrides)
    return transformers.Gemma3TextConfig(**values)


def write_tiny_hf_checkpoint(folder, dtype=torch.float32, max_shard_size=None, seed=0):
    """A random TINY-sized Gemma3ForCausalLM saved with save_pretrained; returns the model."""
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(tiny_hf_config()).eval()
    with torch.no_grad():  # random, non-zero norm scales so the (1 + w) convention is tested
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(0.0, 0.3)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return model



def write_word_level_tokenizer(folder):
    """A tokenizer.json with Gemma's special-token ids (pad 0, eos 1, bos 2, unk 3)."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}))


def write_tiny_model_folder(tmp_path_factory, seed=0, **convert_options):
    """A gemb model folder converted from a random TINY HF checkpoint with a word-level
    tokenizer; convert_options go to gemb.checkpoints.convert.convert (head_dims, ...)."""
    from gemb.checkpoints import convert

    source = tmp_path_factory.mktemp(f"tiny_hf_seed{seed}")
    write_tiny_hf_checkpoint(source, seed=seed)
    write_word_level_tokenizer(source)
    return convert.convert(str(source), tmp_path_factory.mktemp("model") / "model",
                           **convert_options)


def write_tiny_llm_folder(tmp_path_factory, extra_words=()):
    """A TINY model folder whose word-level tokenizer covers the whole 512-id vocabulary (so
    any generated id decodes): WORDS, then `extra_words`, then fillers "w<id>"."""
    import tokenizers

    folder = write_tiny_model_folder(tmp_path_factory, head_dims=(32,), matryoshka_dims=(32,))
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for word in [*WORDS, *extra_words]:
        vocab.setdefault(word, len(vocab))
    while len(vocab) < config.TINY.vocab_size:
        vocab[f"w{len(vocab)}"] = len(vocab)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder
