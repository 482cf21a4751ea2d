"""`gemb export`: a gemb model folder as a sentence-transformers (or plain transformers) folder.

  gemb export --model runs/ft/export --out exported/ft [--dim 768] [--head none]
              [--dtype float32|bfloat16] [--max-length 1024] [--format sentence-transformers|hf]

The sentence-transformers folder holds the transformer as an HF Gemma3TextModel (gemb.export.hf),
then Pooling (the model's pooling), one Dense module per projection layer (bias-free, identity
activation, as gemb's head) and Normalize, like EmbeddingGemma's published folder. --dim keeps
the first D rows of the last projection: a Matryoshka prefix baked in, exactly gemb's re-normalised
prefix after Normalize. --head none exports Transformer + Pooling only (the pooled hidden
states, unnormalised, as `gemb embed --head none`).

Every gemb task template becomes a named prompt ("query" / "document" for the default search
task, "<task>_query" / "<task>_document" for each kind in gemb.data.templates.TASK_DESCRIPTIONS),
so `model.encode(texts, prompt_name="query")` writes texts the way gemb trained on them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from gemb import distributed, paths
from gemb.checkpoints import model_dir as model_dir_lib
from gemb.export import hf

FORMATS = ("sentence-transformers", "hf")
DEFAULT_PROMPT_TASK = "search"
_POOLING_MODES = {"mean": "pooling_mode_mean_tokens", "last_token": "pooling_mode_lasttoken",
                  "first_token": "pooling_mode_cls_token"}


def prompts() -> dict[str, str]:
    """Prompt name -> prefix, from gemb's templates (a template must end with its text)."""
    from gemb.data import templates

    out = {}
    for kind in templates.TASK_DESCRIPTIONS:
        template = templates.default_template(kind)
        for role, render in (("query", template.query), ("document", template.document)):
            marker = "\0TEXT\0"
            rendered = render(marker)
            if not rendered.endswith(marker):
                raise ValueError(f"the {kind} {role} template puts text before its end "
                                 f"({rendered!r}); sentence-transformers prompts are prefixes.")
            out[f"{kind}_{role}"] = rendered[: -len(marker)]
    out["query"] = out[f"{DEFAULT_PROMPT_TASK}_query"]
    out["document"] = out[f"{DEFAULT_PROMPT_TASK}_document"]
    return out


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def export(model_dir: str | Path, out_dir: str | Path, *, fmt: str = "sentence-transformers",
           dim: Optional[int] = None, head: bool = True, dtype: str = "float32",
           max_length: Optional[int] = None) -> Path:
    """Writes the export of `model_dir` to `out_dir` (which must not exist or be empty)."""
    from gemb.embed import DEFAULT_MAX_LENGTH

    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}; use one of {FORMATS}.")
    model_dir, out_dir = paths.as_path(model_dir), paths.as_path(out_dir)
    config, _ = model_dir_lib.read_model_config(model_dir)
    transformer = config.transformer
    max_length = max_length or min(DEFAULT_MAX_LENGTH, transformer.max_length)
    if not 0 < max_length <= transformer.max_length:
        raise ValueError(f"max_length={max_length}: the model has {transformer.max_length} "
                         "positions.")
    if not head and dim is not None:
        raise ValueError("--dim applies to the projection head; with --head none the pooled "
                         "hidden state is exported whole. Drop --dim.")
    if dim is not None and not 0 < dim <= config.embedding_dim:
        raise ValueError(f"dim={dim} does not fit this model's {config.embedding_dim}-wide "
                         f"embedding; use a Matryoshka width such as {config.matryoshka_dims}.")
    if dim is not None and not config.head_dims:
        raise ValueError("this model has no projection head to cut a Matryoshka prefix from; "
                         "drop --dim.")
    if fmt == "hf" and (dim is not None or not head):
        raise ValueError("--format hf exports the transformer only; --dim and --head apply to "
                         "the sentence-transformers format.")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new --out folder.")
    hf.hf_text_config(transformer)  # refuse an inexpressible model before writing anything

    # Every process of a multi-process job reads the params (orbax restores collectively);
    # process 0 writes the folder, once every process has passed the checks above.
    params = model_dir_lib.load_params(model_dir)
    distributed.sync_processes(f"export {out_dir}: checked")
    if not distributed.is_chief():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        hf.write_hf_model(out_dir, transformer, params["transformer"], dtype)
        hf.write_hf_tokenizer(model_dir, out_dir, max_length)
        if fmt == "sentence-transformers":
            _write_sentence_transformers_modules(out_dir, model_dir, config, params, dim, head,
                                                 dtype, max_length)
    except BaseException:
        _remove_quietly(out_dir)  # no half-written export left behind
        raise
    return out_dir


def _remove_quietly(folder) -> None:
    try:
        paths.rmtree(folder)
    except OSError:
        pass


def _write_sentence_transformers_modules(out_dir: Path, model_dir: Path, config, params,
                                         dim: Optional[int], head: bool, dtype: str,
                                         max_length: int) -> None:
    transformer = config.transformer

    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    _write_json(out_dir / "sentence_bert_config.json",
                {"max_seq_length": max_length, "do_lower_case": False})
    pooling = {"word_embedding_dimension": transformer.embed_dim, "include_prompt": True}
    pooling.update({flag: name == config.pooling for name, flag in _POOLING_MODES.items()})
    pooling.update(pooling_mode_max_tokens=False, pooling_mode_mean_sqrt_len_tokens=False,
                   pooling_mode_weightedmean_tokens=False)
    _write_json(out_dir / "1_Pooling" / "config.json", pooling)
    modules.append({"idx": 1, "name": "1", "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling"})
    if head:
        kernels = [np.asarray(params["head"][f"dense_{i}"], np.float32)
                   for i in range(len(config.head_dims))]
        if dim is not None:
            kernels[-1] = kernels[-1][:, :dim]  # a Matryoshka prefix = the first dim outputs
        for kernel in kernels:
            index = len(modules)
            folder = f"{index}_Dense"
            _write_json(out_dir / folder / "config.json", {
                "in_features": kernel.shape[0], "out_features": kernel.shape[1], "bias": False,
                "activation_function": "torch.nn.modules.linear.Identity"})
            hf.write_safetensors(out_dir / folder / "model.safetensors", {
                "linear.weight": np.ascontiguousarray(kernel.T).astype(hf.EXPORT_DTYPES[dtype])})
            modules.append({"idx": index, "name": str(index), "path": folder,
                            "type": "sentence_transformers.models.Dense"})
        modules.append({"idx": len(modules), "name": str(len(modules)),
                        "path": f"{len(modules)}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (out_dir / modules[-1]["path"]).mkdir()
    _write_json(out_dir / "modules.json", modules)
    _write_json(out_dir / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer", "prompts": prompts(), "default_prompt_name": None,
        "similarity_fn_name": "cosine" if head else "dot"})
    (out_dir / "README.md").write_text(_model_card(model_dir, config, dim, head))


def _model_card(model_dir: Path, config, dim: Optional[int], head: bool) -> str:
    width = (dim or config.embedding_dim) if head else config.transformer.embed_dim
    return f"""# {config.transformer.name} embedding model (exported by gemb)

Exported from the gemb model folder `{model_dir}`: {config.pooling} pooling,
{'projection ' + str(config.head_dims) + ', ' if head else 'no projection head, '}{width}-dim
{'normalised ' if head else ''}embeddings.

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("PATH_TO_THIS_FOLDER")
queries = model.encode(["how do I reverse a list?"], prompt_name="query")
documents = model.encode(["Use reversed(xs) or xs[::-1]."], prompt_name="document")
print(model.similarity(queries, documents))
```

Prompts: `query` / `document` (search), and `<task>_query` / `<task>_document` for
{', '.join(sorted({k.rsplit('_', 1)[0] for k in prompts() if '_' in k}))}.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemb export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", required=True, help="a gemb model folder")
    parser.add_argument("--out", required=True, help="the folder to write (new or empty)")
    parser.add_argument("--format", default="sentence-transformers", choices=FORMATS)
    parser.add_argument("--dim", type=int, default=None,
                        help="bake in a Matryoshka prefix of this width")
    parser.add_argument("--head", default="projection", choices=["projection", "none"])
    parser.add_argument("--dtype", default="float32", choices=sorted(hf.EXPORT_DTYPES))
    parser.add_argument("--max-length", type=int, default=None,
                        help="max tokens per text (default: gemb embed's, 1024)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # In a multi-process job process 0 writes the folder; every process learns its outcome.
    failure = None
    try:
        out = export(args.model, args.out, fmt=args.format, dim=args.dim,
                     head=args.head != "none", dtype=args.dtype, max_length=args.max_length)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        failure = f"gemb export: error: {error}"
    if not distributed.all_processes_agree(failure is None):
        print(failure or "gemb export: error: process 0 failed to export; see its output.",
              file=sys.stderr)
        return 1
    if distributed.is_chief():
        print(f"Exported {args.model} to {out} ({args.format}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
