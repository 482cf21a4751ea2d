"""CPU forward throughput of gemb vs transformers on the same Gemma 3 270M weights and inputs.

Both run the bidirectional encoder (transformers: Gemma3TextModel with
use_bidirectional_attention, sdpa attention) in float32 and mean-pool the last hidden state.
Prints tokens/s for each and the ratio. Run on an otherwise idle machine:

    python bench/forward_cpu.py [--batch 8] [--length 128] [--reps 5]
"""

import argparse
import json
import os
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    import jax
    import torch
    import transformers

    from gemb.checkpoints import import_gguf, layout
    from gemb.models import gemma3, pooling

    path = import_gguf.default_gemma3_270m_gguf()
    config, upstream = import_gguf.load_gguf(path)
    params = jax.device_put(layout.to_model_layout(upstream, config))
    tokens = np.random.default_rng(0).integers(4, config.vocab_size, (args.batch, args.length)).astype(np.int32)
    tokens[:, 0] = 2
    segments = np.ones_like(tokens)
    model = gemma3.Transformer(config)

    @jax.jit
    def gemb_forward(p, t, s):
        return pooling.mean_pool(model.apply({"params": p}, t, s), s, 1)

    hf_lm = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    hf_config = hf_lm.config.__class__.from_dict({**hf_lm.config.to_dict(), "quantization_config": None,
                                                  "use_bidirectional_attention": True})
    hf_config._attn_implementation = "sdpa"
    reference = transformers.Gemma3TextModel(hf_config)
    reference.load_state_dict(hf_lm.model.state_dict())
    reference.eval()
    del hf_lm
    torch_tokens = torch.tensor(tokens.astype(np.int64))
    torch_mask = torch.tensor(segments.astype(np.int64))

    def torch_forward():
        with torch.inference_mode():
            hidden = reference(input_ids=torch_tokens, attention_mask=torch_mask).last_hidden_state
            m = torch_mask.unsqueeze(-1).float()
            return ((hidden * m).sum(1) / m.sum(1)).numpy()

    def gemb_call():
        return np.asarray(jax.block_until_ready(gemb_forward(params, tokens, segments)))

    def timed(fn):
        fn()  # compile / warm up
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    ours = gemb_call()[:, 0]
    theirs = torch_forward()
    agreement = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    gemb_time, torch_time = timed(gemb_call), timed(torch_forward)
    tokens_total = args.batch * args.length
    print(json.dumps({
        "batch": args.batch, "length": args.length, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gemb_tokens_per_s": round(tokens_total / gemb_time, 1),
        "transformers_tokens_per_s": round(tokens_total / torch_time, 1),
        "ratio_gemb_over_transformers": round(torch_time / gemb_time, 3),
        "max_rel_diff_pooled": agreement,
    }))


if __name__ == "__main__":
    main()
