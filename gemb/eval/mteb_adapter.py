"""Lets mteb itself run a gemb encoder: `mteb.evaluate(GembMtebEncoder(...), tasks)`.

Optional: needs the `mteb` extra (pip install 'gemb[mteb]'). mteb hands `encode` a DataLoader
whose batches carry the texts under "text", plus a prompt type: PromptType.document becomes
gemb's document role, anything else (queries, and the None that symmetric tasks pass) the query
role. The task type goes to encoders that accept task=, as in gemb's own evaluators, so the two
paths embed every text identically and their scores can be compared number for number.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

try:
    from mteb.models import ModelMeta
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.types import PromptType
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gemb.eval.mteb_adapter needs mteb: pip install 'gemb[mteb]' (pins torch==2.13.0 so pip "
        f"does not pull a CUDA build). Original error: {error}") from error

from gemb.eval import encoders

# mteb task types (TaskMetadata.type) -> the prompt task gemb's evaluators pass for them.
MTEB_TYPE_TO_PROMPT_TASK = {
    "Retrieval": encoders.PROMPT_TASKS["retrieval"],
    "Reranking": encoders.PROMPT_TASKS["reranking"],
    "STS": encoders.PROMPT_TASKS["sts"],
    "Classification": encoders.PROMPT_TASKS["classification"],
    "Clustering": encoders.PROMPT_TASKS["clustering"],
    "PairClassification": encoders.PROMPT_TASKS["pair_classification"],
    "BitextMining": encoders.PROMPT_TASKS["bitext"],
    "Summarization": encoders.PROMPT_TASKS["summarization"],
}


def gemb_model_meta(name: str = "gemb/encoder", *, embed_dim: Optional[int] = None,
                    revision: str = "local", n_parameters: Optional[int] = None,
                    max_tokens: Optional[int] = None, framework: Sequence[str] = ("JAX",),
                    languages: Optional[list[str]] = None) -> ModelMeta:
    """ModelMeta for a locally trained or converted model (mteb files results under `name`)."""
    if "/" not in name:
        name = f"gemb/{name}"  # mteb wants organisation/model
    return ModelMeta(
        loader=None,
        name=name,
        revision=revision,
        release_date=None,
        languages=languages,
        n_parameters=n_parameters,
        memory_usage_mb=None,
        max_tokens=max_tokens,
        embed_dim=embed_dim,
        license=None,
        open_weights=True,
        public_training_code=None,
        public_training_data=None,
        framework=list(framework),
        similarity_fn_name="cosine",
        use_instructions=True,
        training_datasets=None,
    )


class GembMtebEncoder(AbsEncoder):
    """Wraps any gemb encoder (an object with encode(texts, role) or such a callable)."""

    def __init__(self, encoder: Any, model_meta: Optional[ModelMeta] = None,
                 batch_size: int = 32):
        self.model = encoder
        self._encode_batches = encoders.BatchedEncoder(encoder, batch_size=batch_size,
                                                       show_progress=False)
        self.mteb_model_meta = model_meta or gemb_model_meta(
            getattr(encoder, "name", None) or type(encoder).__name__)

    def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str,
               prompt_type: Optional[PromptType] = None, **kwargs: Any) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        role = encoders.DOCUMENT if prompt_type == PromptType.document else encoders.QUERY
        prompt_task = MTEB_TYPE_TO_PROMPT_TASK.get(getattr(task_metadata, "type", None))
        return self._encode_batches.encode(texts, role, task=prompt_task)

    # mteb's default similarity falls back to self.model.similarity when the meta has none; the
    # meta always names cosine, so AbsEncoder.similarity computes cosine.


def from_model_spec(spec: str, dim: Optional[int] = None, batch_size: int = 32,
                    device: str = "cpu") -> GembMtebEncoder:
    """The adapter for a `gemb eval --model` spec (a gemb model folder or st:PATH)."""
    encoder = encoders.load_encoder(spec, dim=dim, device=device)
    name = spec[3:] if spec.startswith("st:") else spec
    return GembMtebEncoder(encoder, gemb_model_meta(name.rstrip("/").split("/")[-1],
                                                    embed_dim=dim), batch_size=batch_size)
