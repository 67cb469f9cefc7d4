"""What a reader is: how a RAG model reads its K retrieved passages into an answer. One object owns the loss the
training step takes, the decoding eval_nq / ask / dev evaluation run, the gold-answer scores of eval_nq --score and
the provenance terms of --provenance / ask --plot; it also decides how the generator sees the passages (the step
and answering hand it every passage's tokens and the doc scores, and nothing else about the generator).

RAG-Sequence and RAG-Token (rag_sequence.py, rag_token.py) marginalise one generator pass per passage
(marginal.MarginalReader); a reader that fuses the passages in the decoder (Fusion-in-Decoder) implements the same
methods over its own generator inputs. Readers are registered by name (registry.py); they are stateless, and one
instance per name is shared.

Shapes: B questions, K passages each, S context tokens per passage, T target tokens, L = max_length generated
tokens, N = B * num_return_sequences answers, V the vocabulary, D the embedding width. Context rows are
example-major: row b*K + k is passage k of question b.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from rag_jax import rag
from rag_jax.readers.generation import GenerationConfig
from rag_jax.retrieval.contexts import ContextFormat

# answering rounds the contexts' width up to this (few shapes to compile), see Reader.context_width
CONTEXT_BUCKET = 64


class Decoded(NamedTuple):
    """A reader's answers and, when provenance was asked for, how much each passage supported them."""

    tokens_NxL: jax.Array  # start token first, filled past the end
    # p(passage | x, y_t, y_<t) per generated token (row t belongs to target tokens_NxL[:, t + 1]): (N, L, K)
    token_posteriors_NxLxK: jax.Array | None = None
    answer_posteriors_NxK: jax.Array | None = None  # p(passage | x, y): (N, K)


class Reader:
    """The interface every reader implements (subclass it, set the class attributes, register an instance)."""

    name: str = ""  # the registry name: config model.reader, eval_nq --reader
    # The transformers class an export of a model with this reader loads as (experiments.export --format=hf, and
    # the `architectures` entry of a Hugging Face RAG directory that says this reader); None: it has none.
    hf_architecture: str | None = None
    decodings: tuple[str, ...] = ()  # eval_nq --decoding modes it has (besides its one default)
    # The reader whose decoding training's periodic dev evaluation runs (None: this one): a cheaper stand-in, for a
    # reader whose own decoding costs many times a training step's time.
    dev_reader: str | None = None

    # ----------------------------------------------------------------------------------------------- training

    def loss(self, model: rag.Rag, params, batch: dict[str, jax.Array], doc_scores_BxK: jax.Array, *, epsilon: float,
             dropout_rng: jax.Array | None) -> jax.Array:
        """The per-question loss (B,) of the training step. `batch` holds context_input_ids and
        context_attention_mask (B, K, S), labels (B, T) (decoder inputs, which are also the targets shifted left);
        doc_scores_BxK carries the gradient to the retriever (unless the reader leaves it out of its loss);
        `epsilon` is label smoothing; dropout_rng None means no dropout."""
        raise NotImplementedError

    def passage_log_likelihoods(self, model: rag.Rag, params, batch: dict[str, jax.Array]) -> jax.Array:
        """log p(y | x, passage k) of the labels for each passage alone (B, K), without dropout: what retriever
        losses that distil the reader into the retriever (Atlas's EMDR², perplexity distillation) train against."""
        raise NotImplementedError

    def context_format(self, fmt: ContextFormat, model_config: Any = None) -> ContextFormat:
        """How this reader's passages are written for the generator, from the run's format (RAG's by default:
        `title / text // question`, Hugging Face's RagRetriever.postprocess_docs); `model_config`: a run config's
        model section, where the reader has settings of its own (None: a loaded model's format, already made)."""
        del model_config
        return fmt

    def passage_token_log_likelihoods(self, model: rag.Rag, params, batch: dict[str, jax.Array],
                                      temperature: float = 1.0) -> jax.Array:
        """log p(y_t | x, passage k, y_<t) of each target token for each passage alone (B, K, T), 0 at pad
        targets, without dropout, from the generator's logits / `temperature` (Atlas's EMDR² temperature_gold):
        the per-token terms of the retriever losses (training/retriever_losses.py)."""
        raise NotImplementedError(f"reader {self.name!r} gives no per-passage answer log-likelihoods: "
                                  "train.retriever_loss pdist/emdr2/loop need them")

    def leave_one_out_losses(self, token_ll_BxKxT: jax.Array, doc_scores_BxK: jax.Array,
                             target_mask_BxT: jax.Array) -> jax.Array:
        """The reader's mean per-token loss of the answer with passage k left out (B, K), from the per-passage
        terms of passage_token_log_likelihoods: the target of Atlas's LOOP retriever loss."""
        raise NotImplementedError(f"reader {self.name!r} has no leave-one-out loss: train.retriever_loss=loop "
                                  "needs one")

    def passage_attention_scores(self, model: rag.Rag, params, batch: dict[str, jax.Array]) -> jax.Array:
        """How much the reader attended to each passage while reading the answer (B, K): Atlas's ADist target (the
        FiD decoder's cross-attention scores times value norms, averaged over layers, heads and answer tokens).
        Only a reader that fuses the passages in one decoder has it (model.reader=fid)."""
        raise NotImplementedError(f"reader {self.name!r} has no cross-attention over the passages: "
                                  "train.retriever_loss=adist needs model.reader=fid")

    # ---------------------------------------------------------------------------------------------- answering

    def context_width(self, context_attention_mask_BKxS: np.ndarray) -> int:
        """How many context columns answering passes to `generate`: by default up to the batch's longest context
        rounded up to CONTEXT_BUCKET (only padding is dropped, which the mask hides anyway)."""
        longest = int(np.asarray(context_attention_mask_BKxS).sum(1).max())
        return min(context_attention_mask_BKxS.shape[1], -(-longest // CONTEXT_BUCKET) * CONTEXT_BUCKET)

    def generate(self, model: rag.Rag, params, context_input_ids_BKxS: jax.Array,
                 context_attention_mask_BKxS: jax.Array, doc_scores_BxK: jax.Array, gen: GenerationConfig, *,
                 decoding: str | None = None, provenance: bool = False) -> Decoded:
        """Answers for B questions from their K passages' generator inputs (B*K, S) and doc scores (B, K), decoded
        with `gen` (greedy or beam search); `decoding` one of `decodings` (None: the default); with `provenance`
        also the passages' posteriors."""
        raise NotImplementedError

    def score(self, model: rag.Rag, params, context_input_ids_BKxS: jax.Array, context_attention_mask_BKxS: jax.Array,
              q_BxD: jax.Array, doc_embeds_BxKxD: jax.Array, labels_BxT: jax.Array) -> dict[str, jax.Array]:
        """eval_nq --score: named per-question scores (B,) of the gold answers `labels_BxT`, in record order."""
        raise NotImplementedError

    def hf_generation_config(self, hf_config: dict[str, Any], generation_file: dict[str, Any] | None
                             ) -> GenerationConfig:
        """The decoding settings transformers' `hf_architecture` resolves for a Hugging Face RAG directory (its
        config.json dict, and its generation_config.json dict or None)."""
        return GenerationConfig.from_hf(generation_file if generation_file is not None else hf_config)

    def __repr__(self) -> str:
        return f"<reader {self.name}>"
