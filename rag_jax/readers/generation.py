"""Generation settings and the logits processors of decoding, with the reference's meanings: the `generate` settings
a reader decodes with (greedy or beam search: search.py), and the processors in the reference's order
(no-repeat-ngram, bad words, min length, forced BOS, forced EOS), applied to the raw next-token scores in greedy
search and after log_softmax in beam search.

Model-agnostic, and matching Hugging Face's `generate` for RagTokenForGeneration / RagSequenceForGeneration
(transformers 5) token for token on the same weights.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

# Hugging Face's GenerationConfig._get_default_generation_params for the fields we support.
_GLOBAL_DEFAULTS = dict(
    max_length=20, min_length=0, num_beams=1, num_return_sequences=1, length_penalty=1.0, early_stopping=False,
    bad_words_ids=None, forced_bos_token_id=None, forced_eos_token_id=None, no_repeat_ngram_size=0,
)  # fmt: skip
_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """The `generate` settings rag_jax supports (greedy and beam search), with the reference's meanings.

    `max_length` / `min_length` count the decoder start token, as in `generate`. One EOS id at most.
    """

    max_length: int = 20
    min_length: int = 0
    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never"
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    no_repeat_ngram_size: int = 0
    decoder_start_token_id: int | None = 2
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2
    pad_token_id: int | None = 1

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        for name in ("eos_token_id", "forced_eos_token_id"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                if len(value) != 1:
                    raise ValueError(f"GenerationConfig.{name}={value}: rag_jax supports a single id; pass one int")
                set_(name, int(value[0]))
        if self.bad_words_ids is not None:
            set_("bad_words_ids", tuple(tuple(int(t) for t in word) for word in self.bad_words_ids))
            if not self.bad_words_ids or any(not word or min(word) < 0 for word in self.bad_words_ids):
                raise ValueError(f"GenerationConfig.bad_words_ids={self.bad_words_ids}: need non-empty id lists")
        # The reference's _prepare_special_tokens: start falls back to BOS, pad to EOS.
        if self.decoder_start_token_id is None:
            set_("decoder_start_token_id", self.bos_token_id)
        if self.pad_token_id is None:
            set_("pad_token_id", self.eos_token_id)
        if self.decoder_start_token_id is None:
            raise ValueError("GenerationConfig: decoder_start_token_id and bos_token_id are both None; set one")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"GenerationConfig.early_stopping={self.early_stopping!r}: use True, False or 'never'")
        if self.max_length < 2:
            raise ValueError(f"GenerationConfig.max_length={self.max_length}: must be >= 2 (it counts the start token)")
        if self.num_beams < 1 or self.num_return_sequences < 1:
            raise ValueError(
                f"GenerationConfig: num_beams ({self.num_beams}) and num_return_sequences "
                f"({self.num_return_sequences}) must be >= 1"
            )

    @classmethod
    def from_hf(cls, config_dict: dict[str, Any], **overrides) -> "GenerationConfig":
        """Settings as RagTokenForGeneration.generate resolves them from a checkpoint's config.json dict.

        Precedence: `overrides` (the caller's generate kwargs) > the dict's top-level value > its "generator"
        section (transformers' GenerationConfig.from_model_config) > transformers' global defaults (max_length 20,
        min_length 0, ...). A generation_config.json dict can be passed the same way. RAG-Token's generate does not
        add the start token to a default max_length (it skips _prepare_generated_length); plain `generate` does, see
        `for_rag_sequence`.
        """
        sections = [config_dict]
        if isinstance(config_dict.get("generator"), dict):
            sections.append(config_dict["generator"])
        values = {}
        for field in dataclasses.fields(cls):
            found = [s[field.name] for s in sections if s.get(field.name) is not None]
            if found:
                values[field.name] = found[0]
            elif field.name in _GLOBAL_DEFAULTS:
                values[field.name] = _GLOBAL_DEFAULTS[field.name]
            else:
                values[field.name] = None
        values.update(overrides)
        return cls(**values)

    @classmethod
    def for_rag_sequence(cls, rag_config_dict: dict[str, Any], **overrides) -> "GenerationConfig":
        """Settings of the generator's own `generate` that RagSequenceForGeneration.generate calls per document.

        That call sees the generator's generation config plus the caller's kwargs. In transformers 5 the generator's
        generation config keeps only fields BartConfig declares (the special token ids and forced_eos_token_id);
        legacy entries such as num_beams or max_length in the "generator" section are dropped, so they are ignored
        here too. A max_length not given defaults to 20 new tokens + the start token, capped by the generator's
        max_position_embeddings (`_prepare_generated_length`). num_beams defaults to 1.
        """
        generator = rag_config_dict.get("generator", rag_config_dict)
        values = dict(_GLOBAL_DEFAULTS)
        values.update({name: generator.get(name) for name in _TOKEN_FIELDS + ("forced_eos_token_id",)})
        max_positions = generator.get("max_position_embeddings", 1 << 30)
        values["max_length"] = min(_GLOBAL_DEFAULTS["max_length"] + 1, max_positions)
        values.update(overrides)
        return cls(**values)

    def to_hf(self) -> dict[str, Any]:
        """The settings as transformers' GenerationConfig fields (generation_config.json)."""
        values = dataclasses.asdict(self)
        if self.bad_words_ids is not None:
            values["bad_words_ids"] = [list(word) for word in self.bad_words_ids]
        return values

    @property
    def beam_fill_token_id(self) -> int:
        """What the reference's beam search writes past a sequence's end: `pad or eos` (so EOS when pad is 0)."""
        if self.eos_token_id is None:
            return -1
        return self.pad_token_id if self.pad_token_id else self.eos_token_id


# ----------------------------------------------------------------------------------------------- logits processors


def _ban(scores_NxV: jax.Array, banned_NxV: jax.Array) -> jax.Array:
    return jnp.where(banned_NxV, -jnp.inf, scores_NxV)


def _tail(seqs_NxL: jax.Array, cur_len: jax.Array, size: int) -> jax.Array:
    """The last `size` tokens before `cur_len` (N, size); garbage when cur_len < size (callers mask that case)."""
    start = jnp.maximum(cur_len - size, 0)
    return jax.lax.dynamic_slice_in_dim(seqs_NxL, start, size, axis=1)


def _scatter_banned(num_rows: int, vocab: int, tokens_NxG: jax.Array, hit_NxG: jax.Array) -> jax.Array:
    """(N, V) mask with tokens_NxG[n, g] set where hit_NxG[n, g]; misses go to a spare column that is dropped."""
    rows = jnp.arange(num_rows)[:, None]
    mask = jnp.zeros((num_rows, vocab + 1), bool).at[rows, jnp.where(hit_NxG, tokens_NxG, vocab)].set(True)
    return mask[:, :vocab]


def no_repeat_ngram(scores_NxV, seqs_NxL, cur_len, ngram_size: int):
    """Bans every token that would complete an n-gram already present in seqs[:, :cur_len] (start token included)."""
    num_rows, length = seqs_NxL.shape
    if length < ngram_size:
        return scores_NxV
    starts_W = jnp.arange(length - ngram_size + 1)
    windows_NxWxn = seqs_NxL[:, starts_W[:, None] + jnp.arange(ngram_size)]
    prefix = _tail(seqs_NxL, cur_len + 1, ngram_size)[:, :-1]  # the last n-1 tokens
    complete_W = starts_W + ngram_size <= cur_len
    hit_NxW = complete_W & jnp.all(windows_NxWxn[..., :-1] == prefix[:, None, :], axis=-1) & (cur_len >= ngram_size)
    return _ban(scores_NxV, _scatter_banned(num_rows, scores_NxV.shape[1], windows_NxWxn[..., -1], hit_NxW))


def bad_words(scores_NxV, seqs_NxL, cur_len, words: tuple[tuple[int, ...], ...], eos_token_id: int | None):
    """Bans the last token of each bad word whose other tokens end seqs[:, :cur_len]; one-token words always.

    As the reference (NoBadWordsLogitsProcessor), the one-token word [eos] is dropped from the list."""
    vocab = scores_NxV.shape[1]
    words = tuple(dict.fromkeys(w for w in words if w != (eos_token_id,)))
    if any(max(w) >= vocab for w in words):
        raise ValueError(f"GenerationConfig.bad_words_ids={words}: ids must be < the vocabulary size {vocab}")
    banned = jnp.zeros(scores_NxV.shape, bool)
    by_prefix: dict[int, list[tuple[int, ...]]] = {}
    for word in words:
        by_prefix.setdefault(len(word) - 1, []).append(word)
    for size, group in by_prefix.items():
        last_G = jnp.asarray([w[-1] for w in group])
        if size == 0:
            banned = banned.at[:, last_G].set(True)
            continue
        prefixes_GxP = jnp.asarray([w[:-1] for w in group])
        hit_NxG = jnp.all(_tail(seqs_NxL, cur_len, size)[:, None, :] == prefixes_GxP[None], axis=-1) & (cur_len >= size)
        last_NxG = jnp.broadcast_to(last_G, hit_NxG.shape)
        banned = banned | _scatter_banned(seqs_NxL.shape[0], vocab, last_NxG, hit_NxG)
    return _ban(scores_NxV, banned)


def _only(scores_NxV, token_id: int, when):
    """Forces `token_id` (score 0, everything else -inf) when `when` holds."""
    forced = jnp.where(jnp.arange(scores_NxV.shape[1]) == token_id, 0.0, -jnp.inf).astype(scores_NxV.dtype)
    return jnp.where(when, forced[None], scores_NxV)


def process_scores(scores_NxV: jax.Array, seqs_NxL: jax.Array, cur_len: jax.Array, gen: GenerationConfig):
    """The reference's logits processors, in its order, for rows whose first `cur_len` tokens are seqs[:, :cur_len]."""
    if gen.no_repeat_ngram_size > 0:
        scores_NxV = no_repeat_ngram(scores_NxV, seqs_NxL, cur_len, gen.no_repeat_ngram_size)
    if gen.bad_words_ids is not None:
        scores_NxV = bad_words(scores_NxV, seqs_NxL, cur_len, gen.bad_words_ids, gen.eos_token_id)
    if gen.eos_token_id is not None and gen.min_length > 0:
        is_eos = jnp.arange(scores_NxV.shape[1]) == gen.eos_token_id
        scores_NxV = _ban(scores_NxV, is_eos[None] & (cur_len < gen.min_length))
    if gen.forced_bos_token_id is not None:
        scores_NxV = _only(scores_NxV, gen.forced_bos_token_id, cur_len == 1)
    if gen.forced_eos_token_id is not None:
        scores_NxV = _only(scores_NxV, gen.forced_eos_token_id, cur_len == gen.max_length - 1)
    return scores_NxV
