"""Model FLOPs of RAG counted analytically: the numerator of model FLOPs utilisation (MFU).

Only matrix multiplications are counted (2 FLOPs per multiply-add): the projections and feed-forward layers, the
attention score and value products over the full (padded, static) sequence lengths, the generator's LM head, and
the doc scores; each generator architecture's formula is its registry entry's (rag_jax/models/bart_generator.py,
t5_generator.py). Softmax, layer norm, activations, embedding gathers and the optimizer update are not counted, nor
is any recomputation: this is the work the model needs, not what a particular compilation does. A training step is
3x the forward pass (forward, plus the gradients with respect to activations and to weights).

Shapes: B questions, each with K retrieved documents; the question encoder reads Lq tokens, the generator's encoder S
tokens per (question, document) and its decoder T tokens. The document encoder is frozen and not part of a step
(its embeddings come from the index).
"""

from __future__ import annotations

from rag_jax import rag
from rag_jax.models import bert, registry
from rag_jax.models.flops import attention_block, feed_forward


def bert_forward_flops(cfg: bert.BertConfig, batch: int, length: int) -> int:
    """Matmul FLOPs of one forward pass of a BERT/DPR encoder over (batch, length) tokens, pooling included."""
    e = cfg.hidden_size
    per_layer = attention_block(batch, length, length, e) + feed_forward(batch * length, e, cfg.intermediate_size)
    total = cfg.num_layers * per_layer
    if cfg.pooling == "pooler":
        total += 2 * batch * e * e
    if cfg.projection_dim:
        total += 2 * batch * e * cfg.projection_dim
    return total


def generator_forward_flops(cfg, rows: int, source_length: int, target_length: int) -> int:
    """Matmul FLOPs of one teacher-forced forward pass of the generator `cfg` configures (its architecture's formula,
    rag_jax/models/registry.py) over `rows` (source, target) pairs, LM head included."""
    return registry.for_config(cfg).forward_flops(cfg, rows, source_length, target_length)


def rag_forward_flops(model: rag.Rag, batch: int, n_docs: int, question_length: int, source_length: int,
                      target_length: int) -> int:  # fmt: skip
    """One forward pass of the RAG loss: q(x) over the questions, the doc scores, the generator over B*K contexts."""
    q_cfg = model.question_encoder_config
    return (bert_forward_flops(q_cfg, batch, question_length) + 2 * batch * n_docs * q_cfg.output_dim
            + generator_forward_flops(model.generator_config, batch * n_docs, source_length, target_length))  # fmt: skip


def rag_train_step_flops(model: rag.Rag, batch: int, n_docs: int, question_length: int, source_length: int,
                         target_length: int) -> int:  # fmt: skip
    """Model FLOPs of one training step (forward + backward) over a global batch: 3x the forward pass."""
    return 3 * rag_forward_flops(model, batch, n_docs, question_length, source_length, target_length)


def trained_doc_encoder_flops(doc_cfg: bert.BertConfig, batch: int, n_docs: int, length: int) -> int:
    """What an end-to-end step (model.doc_encoder.trainable) adds to rag_train_step_flops: the B*K retrieved
    passages through the document encoder at their `length` (index.max_length) tokens, forward and backward."""
    return 3 * bert_forward_flops(doc_cfg, batch * n_docs, length)


# Peak dense bfloat16 matmul throughput of one device (chip) as JAX sees it, from Google's TPU pages.
PEAK_TFLOPS = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}


def index_refresh_flops(doc_cfg: bert.BertConfig, num_passages: int, length: int) -> int:
    """Matmul FLOPs of one index refresh: every passage through the document encoder at `length` tokens (an upper
    bound for build_index's length-bucketed batches, whose passages are padded only to their own group's longest)."""
    return bert_forward_flops(doc_cfg, num_passages, length)


def refresh_interval_for_share(refresh_seconds: float, step_seconds: float, share: float = 0.1) -> int:
    """The fewest steps between refreshes for which refreshing costs at most `share` of the training time
    (refresh time / (interval * step time + refresh time) <= share)."""
    return max(1, -(-int(round(refresh_seconds * (1 - share) / share * 1e6)) // int(round(step_seconds * 1e6))))
