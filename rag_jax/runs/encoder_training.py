"""How a run trains its two encoders, read from the config alone (no jax): their learning-rate scales, with
fine-tuning defaults for pretrained encoders, and the combinations of encoder training, reranking and index
refreshes that cannot work (config_check refuses them at start-up).

Learning-rate scales multiply optim.learning_rate (the generator's). None (the default of
optim.question_encoder_lr_scale and model.doc_encoder.lr_scale) means: a pretrained encoder is fine-tuned at
FINE_TUNING_LEARNING_RATE (or at optim.learning_rate when that is lower), a randomly initialised one at
optim.learning_rate. A small generator trained from scratch wants ~1e-3, which moves a pretrained encoder far
from the space its index was embedded in within tens of steps (issue 32: a trained all-MiniLM-L6-v2 at 1e-3 took
gold recall@K from 0.97 to 0.00 at the first index refresh).
"""

from __future__ import annotations

import ml_collections

# The peak rate pretrained retrievers are fine-tuned with: RAG's recipe (Hugging Face's research project,
# finetune_rag.sh: 3e-5, which trains the DPR question encoder); DPR trains its BERT encoders at 2e-5
# (facebookresearch/DPR conf/train/biencoder_nq.yaml) and all-MiniLM-L6-v2 was fine-tuned at 2e-5 (its model card:
# AdamW, 2e-5, 500 warm-up steps); BERT's fine-tuning grid is {2, 3, 5}e-5.
FINE_TUNING_LEARNING_RATE = 3e-5
RANDOM = "random"
DOC_ENCODER = "doc_encoder"  # model.question_encoder.init: start q(x) as a copy of the document encoder d(z)


def _get(node, dotted: str, default):
    for part in dotted.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            return default
        node = node[part]
    return node


def doc_encoder_pretrained(config: ml_collections.ConfigDict) -> bool:
    return _get(config, "model.doc_encoder.init", RANDOM) != RANDOM


def question_encoder_pretrained(config: ml_collections.ConfigDict) -> bool:
    """q(x) starts from a checkpoint: a RAG checkpoint, its own, or the pretrained document encoder's."""
    if _get(config, "model.init_from_rag", None) is not None:
        return True
    init = _get(config, "model.question_encoder.init", RANDOM)
    return doc_encoder_pretrained(config) if init == DOC_ENCODER else init != RANDOM


def default_scale(config: ml_collections.ConfigDict, pretrained: bool) -> float:
    """The learning-rate scale an encoder gets when its field is None (see the module docstring)."""
    if not pretrained:
        return 1.0
    return min(1.0, FINE_TUNING_LEARNING_RATE / float(config.optim.learning_rate))


def question_encoder_lr_scale(config: ml_collections.ConfigDict) -> float:
    """q(x)'s learning rate over optim.learning_rate; 0 freezes it. (train_retriever's configs have no such field:
    1.)"""
    if "question_encoder_lr_scale" not in config.optim:
        return 1.0
    value = config.optim.question_encoder_lr_scale
    return default_scale(config, question_encoder_pretrained(config)) if value is None else float(value)


def trains_doc_encoder(config: ml_collections.ConfigDict) -> bool:
    """model.doc_encoder.trainable (absent from configs saved before it: the paper's frozen d(z))."""
    return bool(_get(config, "model.doc_encoder.trainable", False))


def doc_encoder_lr_scale(config: ml_collections.ConfigDict) -> float:
    """A trained d(z)'s learning rate over optim.learning_rate (1 when d(z) is frozen: it has no parameters)."""
    if not trains_doc_encoder(config):
        return 1.0
    value = _get(config, "model.doc_encoder.lr_scale", 1.0)
    return default_scale(config, doc_encoder_pretrained(config)) if value is None else float(value)


def combination_problem(config: ml_collections.ConfigDict, refreshes: bool) -> str | None:
    """The first combination of encoder training, reranking and index refreshes (`refreshes`: index.refresh_every
    asks for any) that cannot work, as one line naming the fields and what to set; None when there is none."""
    trainable = trains_doc_encoder(config)
    candidates = _get(config, "retrieval.rerank_candidates", 0)
    if candidates and not trainable:
        return (f"config retrieval.rerank_candidates={candidates} reranks with the current document encoder, but "
                "model.doc_encoder.trainable=False (a frozen one would keep the index's order); set "
                "--config.model.doc_encoder.trainable=True or --config.retrieval.rerank_candidates=0")
    if candidates and candidates < config.model.n_docs:
        return (f"config retrieval.rerank_candidates={candidates} is below model.n_docs={config.model.n_docs}: "
                "rerank L >= K candidates (or 0 for none)")
    frozen_question_encoder = question_encoder_lr_scale(config) == 0
    if _get(config, "retrieval.learn_score_scale", False) and frozen_question_encoder:
        return ("config retrieval.learn_score_scale=True trains the scale with q(x), which "
                "optim.question_encoder_lr_scale=0 freezes; set --config.optim.question_encoder_lr_scale above 0 "
                "or --config.retrieval.learn_score_scale=false")
    if trainable and frozen_question_encoder and refreshes:
        fine_tuning = default_scale(config, question_encoder_pretrained(config))
        return (f"config model.doc_encoder.trainable=True with index.refresh_every="
                f"{_get(config, 'index.refresh_every', '0')!r} re-embeds the corpus with a trained d(z) that the "
                "frozen q(x) (optim.question_encoder_lr_scale=0) cannot follow: retrieval breaks at the first "
                f"refresh; train q(x) too (--config.optim.question_encoder_lr_scale={fine_tuning:g}: a learning rate "
                f"of {fine_tuning * float(config.optim.learning_rate):.0e}), or set --config.index.refresh_every=0 or "
                "--config.model.doc_encoder.trainable=False")
    return None
