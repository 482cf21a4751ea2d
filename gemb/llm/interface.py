"""The one LLM interface of the data-quality stages, and `make_llm` to pick a backend.

Two backends implement it:
  * `gemb.llm.decoder.GemmaDecoder`: gemb's own Gemma 3, in this process (a model folder).
  * `gemb.llm.http.OpenAIServerLLM`: any server speaking the OpenAI completions API (vLLM,
    llama.cpp's llama-server, `gemb llm serve`), by URL.

The stages take an `LLM` and never ask which one they hold.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from gemb.llm.decoder import SamplingConfig


@runtime_checkable
class LLM(Protocol):
    """What the data-quality stages need from a language model."""

    def generate(self, prompts: Sequence[str], sampling: "SamplingConfig") -> list[str]:
        """One continuation per prompt, in order: at most sampling.max_new_tokens tokens, cut
        before the first stop string (and at the model's end-of-sequence token); the prompt is
        not repeated. temperature 0 is greedy."""
        ...

    def log_likelihood(self, prompts: Sequence[str], continuations: Sequence[str]
                       ) -> np.ndarray:
        """float64 [N]: log p(continuation | prompt) per pair, the sum of the log-probs of the
        continuation's tokens. Tokenisation is the model's: a continuation that does not start
        at a token boundary of prompt + continuation (e.g. " Paris" where the tokenizer glues
        the space to the prompt's last word) is scored over slightly different tokens by the
        two backends; start continuations with a space (or at a word boundary) to avoid it."""
        ...


def is_server_url(spec: str | os.PathLike) -> bool:
    return isinstance(spec, str) and spec.startswith(("http://", "https://"))


def parse_mesh(text: str) -> tuple[int, int, int]:
    """"DATA,FSDP,TENSOR" (one may be -1: the rest of the devices) -> a tuple."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise ValueError(f"--llm_mesh {text!r} is not DATA,FSDP,TENSOR (e.g. 1,1,8 or -1,1,1).")
    return values


def make_llm(spec, mesh: Sequence[int] | str | None = None, **kwargs) -> LLM:
    """An LLM from what a user names (e.g. a --llm flag):
      * "http://host:port" (or https): OpenAIServerLLM(spec, **kwargs);
      * a model folder (local or gs://, written by `gemb convert`): GemmaDecoder.from_model_dir(
        spec, **kwargs), sharded over this process's devices as `mesh` says ((data, fsdp,
        tensor), or "D,F,T"; default: every local device on the data axis, each taking its
        share of the rows; a model too large for one device wants fsdp or tensor, e.g. 1,1,8);
      * an object that already is an LLM: returned as is.
    """
    if isinstance(spec, (str, os.PathLike)):
        if is_server_url(spec):
            if mesh is not None:
                raise ValueError(f"a mesh ({mesh}) applies to a model folder, not to the server "
                                 f"{spec}; the server shards its own model.")
            from gemb.llm.http import OpenAIServerLLM

            return OpenAIServerLLM(spec, **kwargs)
        import jax

        from gemb.llm.decoder import GemmaDecoder, local_partitioner

        if isinstance(mesh, str):
            mesh = parse_mesh(mesh)
        if mesh is not None or jax.local_device_count() > 1:
            kwargs.setdefault("partitioner", local_partitioner(mesh or (-1, 1, 1)))
        return GemmaDecoder.from_model_dir(spec, **kwargs)
    if isinstance(spec, LLM):
        if kwargs or mesh is not None:
            raise TypeError(f"options {sorted(kwargs) or ['mesh']} cannot apply to an existing "
                            f"{type(spec).__name__}.")
        return spec
    raise TypeError(f"make_llm takes a model folder, an http(s):// URL or an LLM, got "
                    f"{type(spec).__name__}.")


def add_llm_argument(parser) -> None:
    """The --llm flag of every data stage (what `make_llm` takes)."""
    parser.add_argument("--llm", required=True,
                        help="a gemb model folder (its Gemma 3 decoder, in this process) or an "
                             "OpenAI-compatible server URL (http://host:port)")
    parser.add_argument("--llm_mesh", metavar="DATA,FSDP,TENSOR",
                        help="how a model folder's decoder is sharded over this process's "
                             "devices (default: all of them on the data axis; e.g. 1,1,8 for a "
                             "model that needs 8 devices)")


def llm_from_args(args) -> LLM:
    """The LLM of a stage's --llm and --llm_mesh flags."""
    return make_llm(args.llm, mesh=getattr(args, "llm_mesh", None))
