"""Small random-weight Hugging Face models saved with `save_pretrained`: the parity references of the tests.

Sizes are deliberately odd (hidden sizes not powers of two, odd intermediate sizes, unequal depths) so that a
transposed kernel or a wrong head split cannot pass by symmetry.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import transformers

ODD_BERT = dict(
    vocab_size=97, hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=37,
    max_position_embeddings=40, type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)  # fmt: skip
ODD_BART = dict(
    vocab_size=101, d_model=36, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
    decoder_attention_heads=3, encoder_ffn_dim=37, decoder_ffn_dim=41, max_position_embeddings=48,
    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
    eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
)  # fmt: skip

# T5: d_kv * heads != d_model, unequal depths, a bucket count and distance that put positions in the log buckets.
ODD_T5 = dict(
    vocab_size=103, d_model=34, d_kv=7, d_ff=39, num_layers=2, num_decoder_layers=3, num_heads=5,
    relative_attention_num_buckets=12, relative_attention_max_distance=20, dropout_rate=0.0,
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)  # fmt: skip
T5_VERSIONS = {"v1.0": dict(feed_forward_proj="relu"),
               "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)}  # fmt: skip


def randomize(model: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Gives every parameter (LayerNorm and biases included) random values, so none stays at 0 or 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
        for name, buffer in model.named_buffers():
            if "final_logits_bias" in name:
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * std)
    return model.eval()


def layer_norms_near_one(model: torch.nn.Module, seed: int, pattern: str) -> torch.nn.Module:
    """Sets the LayerNorm weights whose names match `pattern` to 1 + N(0, 0.1): randomize's values near 0 would
    make the normalised activations, and the gradients through them, too small to compare."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(pattern, name):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
    return model


def bert_model(seed=0, **overrides) -> transformers.BertModel:
    return randomize(transformers.BertModel(transformers.BertConfig(**{**ODD_BERT, **overrides})), seed)


def dpr_config(**overrides) -> transformers.DPRConfig:
    return transformers.DPRConfig(**{**ODD_BERT, **overrides})


def dpr_question_encoder(seed=0, **overrides) -> transformers.DPRQuestionEncoder:
    return randomize(transformers.DPRQuestionEncoder(dpr_config(**overrides)), seed)


def dpr_context_encoder(seed=0, **overrides) -> transformers.DPRContextEncoder:
    return randomize(transformers.DPRContextEncoder(dpr_config(**overrides)), seed)


def bart_config(**overrides) -> transformers.BartConfig:
    return transformers.BartConfig(**{**ODD_BART, **overrides})


def bart_model(seed=0, **overrides) -> transformers.BartForConditionalGeneration:
    return randomize(transformers.BartForConditionalGeneration(bart_config(**overrides)), seed)


def t5_config(version: str = "v1.0", **overrides) -> transformers.T5Config:
    return transformers.T5Config(**{**ODD_T5, **T5_VERSIONS[version], **overrides})


def untie_t5_head(model) -> None:
    """Gives a v1.1 model its own LM head: transformers 5 ties every T5's head at construction and keeps it untied
    only when it differs from the embedding (as in real v1.1 / Flan-T5 checkpoints)."""
    if not model.config.scale_decoder_outputs:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())


def t5_model(version: str = "v1.0", seed=0, **overrides) -> transformers.T5ForConditionalGeneration:
    model = transformers.T5ForConditionalGeneration(t5_config(version, **overrides))
    untie_t5_head(model)
    return randomize(model, seed)


# tests/test_decode.py's generation-friendly RAG: the special tokens' final_logits_bias boosts.
DECODE_EOS_BIAS = 5.0  # EOS likely enough that some beams finish early, not so likely that all do
DECODE_BOS_BIAS = 3.5  # BOS likely enough to repeat, so that banning [0, 0] matters


def decode_rag(n_docs: int) -> transformers.RagTokenForGeneration:
    """A random RAG (BART generator) whose greedy and beam answers vary with the context: weights with std 0.5 (at
    std 1.0 one token wins every step whatever the context), LayerNorms near the identity (a random LayerNorm bias
    alone picks the argmax token otherwise), and final_logits_bias small except for EOS, raised so that some
    hypotheses end early, and BOS."""
    config = transformers.RagConfig.from_question_encoder_generator_configs(
        dpr_config(num_hidden_layers=1),
        bart_config(forced_eos_token_id=None, encoder_layers=1, decoder_layers=2),
        n_docs=n_docs,
    )
    reference = randomize(transformers.RagTokenForGeneration(config), seed=5, std=0.5)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in reference.rag.generator.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                centre = 1.0 if name.endswith("weight") else 0.0
                p.copy_(centre + 0.1 * torch.randn(p.shape, generator=generator))
        bias = reference.rag.generator.final_logits_bias
        bias.mul_(0.1)
        bias[0, config.generator.eos_token_id] += DECODE_EOS_BIAS
        bias[0, config.generator.bos_token_id] += DECODE_BOS_BIAS
    return reference


def padded_ids(rng: np.random.Generator, batch: int, length: int, vocab: int, pad: int, first: int | None = None):
    """Random ids (B, L) with right padding of varied lengths (the first row unpadded) and their 0/1 mask."""
    ids = rng.integers(3, vocab, size=(batch, length))
    lengths = np.concatenate([[length], rng.integers(2, length, size=batch - 1)])
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask > 0, ids, pad)
    if first is not None:
        ids[:, 0] = first
    return ids, mask


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def save_sentence_transformer(model: transformers.BertModel, directory, *, pooling: str = "mean",
                              normalize: bool = True, transformer_path: str = "") -> None:
    """Saves `model` in the sentence-transformers layout: modules.json listing Transformer (in `transformer_path`,
    "" = the directory itself, as current versions save; old ones used "0_Transformer"), Pooling (1_Pooling) and,
    when `normalize`, Normalize (2_Normalize, which has no files)."""
    import json
    import os

    model.save_pretrained(os.path.join(directory, transformer_path))
    with open(os.path.join(directory, transformer_path, "sentence_bert_config.json"), "w") as f:
        json.dump({"max_seq_length": 32, "do_lower_case": False}, f)
    modes = {f"pooling_mode_{m}": m == {"mean": "mean_tokens", "cls": "cls_token"}.get(pooling, pooling)
             for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")}  # fmt: skip
    os.makedirs(os.path.join(directory, "1_Pooling"), exist_ok=True)
    with open(os.path.join(directory, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": model.config.hidden_size, **modes}, f)
    modules = [{"idx": 0, "name": "0", "path": transformer_path, "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    with open(os.path.join(directory, "modules.json"), "w") as f:
        json.dump(modules, f)


def sentence_transformer_reference(model: transformers.BertModel, ids, mask, *, pooling: str = "mean",
                                   normalize: bool = True) -> np.ndarray:
    """What sentence-transformers computes: BertModel's last hidden states, pooled ([CLS], or the mean over the
    attention mask with the count clamped at 1e-9), then torch.nn.functional.normalize."""
    ids, mask = torch.as_tensor(np.asarray(ids)), torch.as_tensor(np.asarray(mask))
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        if pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return pooled.numpy()
