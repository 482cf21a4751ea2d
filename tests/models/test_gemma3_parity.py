"""Golden parity of gemb's Gemma 3 with transformers on the real 270M weights (fp32).

Causal mode is compared as a language model (logits); bidirectional mode as an encoder
(mean-pooled final hidden states) against Gemma3TextModel with use_bidirectional_attention,
which is what EmbeddingGemma runs.
"""

import numpy as np
import pytest

import jax.numpy as jnp

from gemb.checkpoints import layout
from gemb.models import gemma3, pooling

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

PROMPTS = [
    # English prose
    "The history of the printing press begins long before Gutenberg. Woodblock printing spread "
    "across East Asia for centuries, and movable type made of ceramic and later metal appeared "
    "in China and Korea. What changed in fifteenth-century Europe was the combination of an "
    "oil-based ink, a screw press adapted from wine making, and a hand mould that cast letters.",
    "Photosynthesis converts light energy into chemical energy. In the light-dependent reactions, "
    "water is split and oxygen is released, while ATP and NADPH are produced; the Calvin cycle then "
    "uses them to fix carbon dioxide into sugars. The efficiency of the whole process in crops is "
    "rarely above two percent of incoming sunlight, which is why breeders study it so closely.",
    "Question: which sorting algorithm has the best worst-case time on arbitrary comparisons? "
    "Answer: merge sort and heapsort both guarantee O(n log n) comparisons in the worst case, "
    "whereas quicksort degrades to quadratic time on adversarial inputs unless the pivot is "
    "chosen with a linear-time median algorithm, which is rarely done in practice.",
    # Cyrillic
    "Москва является столицей Российской Федерации и крупнейшим по численности населения городом "
    "страны. Город расположен на реке Москве в центре Восточно-Европейской равнины. Московский "
    "метрополитен, открытый в 1935 году, известен своими станциями, украшенными мозаиками.",
    # Devanagari
    "भारत दक्षिण एशिया में स्थित एक विशाल देश है। इसकी राजधानी नई दिल्ली है और यहाँ अनेक भाषाएँ "
    "बोली जाती हैं। हिमालय पर्वत उत्तर में स्थित है, जबकि दक्षिण में हिंद महासागर फैला हुआ है। "
    "देश की अर्थव्यवस्था कृषि, उद्योग और सेवाओं पर आधारित है, और यहाँ की संस्कृति हज़ारों वर्ष पुरानी है।",
    # CJK
    "東京は日本の首都であり、世界で最も人口の多い都市圏の一つです。江戸時代には将軍の城下町として"
    "発展し、明治維新の後に天皇が京都から移りました。現在では金融、文化、交通の中心地となっています。"
    "毎年多くの観光客が訪れ、浅草寺や明治神宮などの歴史的な場所を見学します。",
    # Python code
    "def binary_search(items, target):\n    low, high = 0, len(items) - 1\n    while low <= high:\n"
    "        middle = (low + high) // 2\n        if items[middle] == target:\n            return middle\n"
    "        if items[middle] < target:\n            low = middle + 1\n        else:\n"
    "            high = middle - 1\n    return -1\n",
    "import json\nfrom pathlib import Path\n\n\ndef load_records(path: Path) -> list[dict]:\n"
    "    \"\"\"Read one JSON object per line, skipping blank lines.\"\"\"\n    records = []\n"
    "    with path.open(encoding='utf-8') as handle:\n        for line in handle:\n"
    "            if line.strip():\n                records.append(json.loads(line))\n    return records\n",
]


def _padded_batch(tokenizer, texts):
    ids = [tokenizer(t).input_ids for t in texts]
    length = max(len(i) for i in ids)
    tokens = np.zeros((len(ids), length), np.int32)
    segments = np.zeros((len(ids), length), np.int32)
    for row, seq in enumerate(ids):
        tokens[row, : len(seq)] = seq
        segments[row, : len(seq)] = 1
    return ids, tokens, segments


@pytest.fixture(scope="module")
def causal_model(gemma3_270m_upstream):
    config, upstream = gemma3_270m_upstream
    config = config.replace(attention_mode="causal")
    return gemma3.Transformer(config), layout.to_model_layout(upstream, config)


def test_prompts_are_long_and_mixed(hf_gemma3_270m_tokenizer):
    lengths = [len(hf_gemma3_270m_tokenizer(t).input_ids) for t in PROMPTS]
    assert len(PROMPTS) >= 8 and min(lengths) >= 64, lengths


def test_causal_logits_match_transformers(causal_model, hf_gemma3_270m_causal_lm,
                                          hf_gemma3_270m_tokenizer):
    model, params = causal_model
    ids, tokens, segments = _padded_batch(hf_gemma3_270m_tokenizer, PROMPTS)
    _, logits = model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(segments),
                            return_logits=True)
    logits = np.asarray(logits)
    for row, seq in enumerate(ids):
        with torch.no_grad():
            reference = hf_gemma3_270m_causal_lm(torch.tensor([seq])).logits[0].numpy()
        ours = logits[row, : len(seq)]
        diff = np.abs(ours - reference).max()
        assert diff <= 1e-3 * np.abs(reference).max(), (row, diff, np.abs(reference).max())
        np.testing.assert_array_equal(ours.argmax(-1), reference.argmax(-1))


def test_capital_of_france(causal_model, hf_gemma3_270m_tokenizer):
    model, params = causal_model
    ids = hf_gemma3_270m_tokenizer("The capital of France is").input_ids
    _, logits = model.apply({"params": params}, jnp.asarray([ids]), return_logits=True)
    top5 = np.argsort(-np.asarray(logits[0, -1]))[:5]
    words = [hf_gemma3_270m_tokenizer.decode([int(i)]) for i in top5]
    assert " Paris" in words, words


def test_bidirectional_mean_pooled_matches_transformers(gemma3_270m_upstream,
                                                        hf_gemma3_270m_causal_lm,
                                                        hf_gemma3_270m_tokenizer):
    config, upstream = gemma3_270m_upstream
    model = gemma3.Transformer(config)  # bidirectional is the default
    params = layout.to_model_layout(upstream, config)
    hf_config = hf_gemma3_270m_causal_lm.config.__class__.from_dict(
        {**hf_gemma3_270m_causal_lm.config.to_dict(), "use_bidirectional_attention": True,
         "quantization_config": None})
    reference_model = transformers.Gemma3TextModel(hf_config)
    reference_model.load_state_dict(hf_gemma3_270m_causal_lm.model.state_dict())
    reference_model.eval()

    def pooled_pair(texts):
        ids, tokens, segments = _padded_batch(hf_gemma3_270m_tokenizer, texts)
        hidden = model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(segments))
        ours = np.asarray(pooling.mean_pool(hidden, jnp.asarray(segments), 1))[:, 0]
        with torch.no_grad():
            out = reference_model(input_ids=torch.tensor(tokens.astype(np.int64)),
                                  attention_mask=torch.tensor(segments.astype(np.int64))
                                  ).last_hidden_state.numpy()
        mask = segments[..., None].astype(np.float64)
        return ours, (out * mask).sum(1) / mask.sum(1), tokens, segments

    # The padded batch of prompts, then one text longer than the 512-token window alone: it
    # exercises the symmetric sliding window (transformers reaches window // 2 to each side).
    long_text = " ".join(PROMPTS[:3]) * 3
    assert len(hf_gemma3_270m_tokenizer(long_text).input_ids) > config.sliding_window_size
    for texts in (PROMPTS, [long_text]):
        ours, reference, tokens, segments = pooled_pair(texts)
        relative = np.linalg.norm(ours - reference, axis=-1) / np.linalg.norm(reference, axis=-1)
        assert relative.max() <= 1e-4, relative
    # And it really is bidirectional: the causal model gives different pooled states.
    causal_hidden = gemma3.Transformer(config.replace(attention_mode="causal")).apply(
        {"params": params}, jnp.asarray(tokens), jnp.asarray(segments))
    causal = np.asarray(pooling.mean_pool(causal_hidden, jnp.asarray(segments), 1))[:, 0]
    assert np.abs(causal - ours).max() > 1e-2
