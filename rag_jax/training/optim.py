"""The optimizer of a run: gradient clipping, then AdamW with warm-up and linear decay (the Hugging Face research
project's recipe), weight decay off for biases and layer norms, and learning-rate scales for q(x)
(optim.question_encoder_lr_scale) and a trained d(z) (model.doc_encoder.lr_scale); unset, a pretrained encoder's
is its fine-tuning rate over optim.learning_rate (runs/encoder_training.py)."""

from __future__ import annotations

import jax
import ml_collections
import optax

from rag_jax.runs import encoder_training

_NO_DECAY = ("bias", "scale", "final_logits_bias")  # REF's no_decay list: biases and LayerNorm weights


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up from 0, then polynomial (power 1) decay to end_learning_rate at train.steps (REF)."""
    o = config.optim
    warmup = int(o.warmup_steps)
    decay = optax.polynomial_schedule(o.learning_rate, o.end_learning_rate, power=1.0,
                                      transition_steps=max(1, config.train.steps - warmup))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, warmup), decay], [warmup])


def _decay_mask(params):
    """True for weights that get weight decay: everything but biases and layer-norm scales (REF no_decay)."""

    def decays(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return names[-1] not in _NO_DECAY

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Gradient clipping then AdamW with the schedule above (the HF research project's optimizer)."""
    o = config.optim
    parts = []
    if o.max_grad_norm and o.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(o.max_grad_norm))
    parts.append(optax.adamw(learning_rate_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps,
                             weight_decay=o.weight_decay, mask=_decay_mask))
    doc_scale = doc_encoder_lr_scale(config)
    if doc_scale != 1.0:
        parts.append(optax.masked(optax.scale(doc_scale), _part_mask("doc_encoder")))
    scale = encoder_training.question_encoder_lr_scale(config)
    if freezes_question_encoder(config):  # frozen q(x): no Adam moments for it (22M parameters of all-MiniLM-L6-v2 not updated a step)
        return optax.multi_transform({"trained": optax.chain(*parts), "frozen": optax.set_to_zero()},
                                     _question_encoder_labels)
    if scale != 1.0:
        parts.append(optax.masked(optax.scale(scale), _part_mask("question_encoder")))
    return optax.chain(*parts)


def doc_encoder_lr_scale(config: ml_collections.ConfigDict) -> float:
    """The trained document encoder's learning rate over optim.learning_rate (1 when it is frozen: no params)."""
    return encoder_training.doc_encoder_lr_scale(config)


def freezes_question_encoder(config: ml_collections.ConfigDict) -> bool:
    """optim.question_encoder_lr_scale 0: q(x) never changes (the step also skips its backward pass)."""
    return encoder_training.question_encoder_lr_scale(config) == 0.0


def _question_encoder_labels(params):
    return {part: "frozen" if part == "question_encoder" else "trained" for part in params}


def _part_mask(name: str):
    """An optax mask function: True on every parameter of params[name]."""
    return lambda params: {part: jax.tree_util.tree_map(lambda _: part == name, tree) for part, tree in params.items()}
