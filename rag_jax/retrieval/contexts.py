"""Generator inputs from retrieved passages, formed exactly as Hugging Face's `RagRetriever.postprocess_docs`, on
the host (strings, then the tokenizer) and on the devices (token tables glued inside the jitted step).

On the host, per (question, passage): `prefix + title + title_sep + text + doc_sep + question`, with one leading
and one trailing `"` stripped from the title and every double space replaced once by a single space (Python's
non-overlapping `str.replace`, as the reference does). The question is not the raw string but the question-encoder
ids decoded back with `skip_special_tokens=True` (lower-cased WordPiece text for BERT). The generator tokenizer
pads to `max_combined_length` and truncates the end, so a long passage pushes the question out: a reference quirk
kept for parity.

On the devices (retrieval inside the training step, config retrieval.mode="device") there are no strings, so
instead: every passage's generator tokens are computed once (`passage_token_table`, cached in the index directory)
and split over the devices with the index rows (`corpus` logical axis); the host tokenises only the question part
of each batch (`question_tokens`); `make_sharded_gather` fetches the retrieved rows of the token table and of the
embeddings, and `assemble_contexts` glues `[BOS] passage-part question-part EOS` together (BART: `<s> ... </s>`;
T5, which has no BOS: `... </s>`) and truncates it as the tokenizer would.

Why device assembly gives the reference's ids: the reference tokenises the string
`(prefix + title + title_sep + text + doc_sep + question).replace("  ", " ")`. With doc_sep ending in exactly one
space after a non-space (" // "), that string is passage_part + question_part where
  passage_part  = combine(title, text, "")[:-1]           ("... // " without its last space)
  question_part = (" " + question).replace("  ", " ")
because no run of spaces crosses the boundary. Both generator tokenizers split text into pre-tokens before their
subword model runs, and subwords never cross pre-tokens; the join is a pre-token boundary in both:
- BART, byte-level BPE: GPT-2's pre-tokenizer regex matches at a position depending only on the text from there
  on; the match holding "//" cannot take a space, so a pre-token boundary falls exactly before the question's
  leading space.
- T5, SentencePiece (transformers' T5Tokenizer: a per-character normaliser, then WhitespaceSplit + Metaspace with
  "▁" prepended to every word): the space at the join is a whitespace split, and the question part's lone leading
  space becomes the "▁" that Metaspace would prepend to its first word anyway.
Hence tokens(string) = tokens(passage_part) + tokens(question_part), and the tokenizer's truncation keeps the first
max_combined_length - 2 (BART) or - 1 (T5) of them before the final EOS. tests/test_train.py checks this on the
bundled corpus for both; `check_split_tokenization` checks it for the tokenizer and corpus of a run at start-up and
refuses device retrieval, naming the passage, where it fails (a tokenizer whose pre-tokenizer joins across spaces).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from rag_jax import files
from rag_jax.retrieval import corpus, index_io, passage_store


class SplitTokenizationError(ValueError):
    """The generator tokenizer does not tokenise passage and question parts independently (device retrieval)."""


# Question strings as the question encoder's decoding gives them (lower-cased WordPiece text), with the punctuation,
# digits, accents and empty question that could meet the passage part at the join; `check_split_tokenization`
# pairs them with a run's first passages.
PROBE_QUESTIONS = ("who sang \" i ' m a believer \"?", "when was the 1, 000th episode aired", "' s", "", "- 5 %",
                   "cafe noir a la francaise", "naive ( film ) cast", "mcdonald's .")


@dataclasses.dataclass(frozen=True)
class ContextFormat:
    title_sep: str = " / "
    doc_sep: str = " // "
    max_combined_length: int = 300
    prefix: str = ""
    # "rag": the string above; "fid": Fusion-in-Decoder's `question: {question} title: {title} context: {text}`
    # (facebookresearch/FiD src/data.py: the question and passage prefixes joined by single spaces, no cleaning).
    layout: str = "rag"


def combine(title: str, text: str, question: str, fmt: ContextFormat) -> str:
    if fmt.layout == "fid":
        return f"question: {question} title: {title} context: {text}"
    title = title.removeprefix('"').removesuffix('"')
    return (fmt.prefix + title + fmt.title_sep + text + fmt.doc_sep + question).replace("  ", " ")


def decode_questions(question_input_ids_BxL: np.ndarray, question_tokenizer) -> list[str]:
    """The question strings the reference conditions the generator on."""
    return question_tokenizer.batch_decode(np.asarray(question_input_ids_BxL).tolist(), skip_special_tokens=True)


def context_questions(written: Sequence[str] | None, question_input_ids_BxL: np.ndarray, question_tokenizer,
                      fmt: ContextFormat) -> list[str]:
    """The question strings the contexts carry: for RAG the question-encoder ids decoded back, as the reference
    does; for FiD the question as written (facebookresearch/FiD src/data.py formats the raw question). Decoding
    lower-cases for an uncased question encoder (all-MiniLM-L6-v2, BERT's), and a FiD row's encoder must match the
    question's entity to the passage's cased title to tell the entity's passage from the others."""
    if fmt.layout == "fid" and written is not None:
        return list(written)
    return decode_questions(question_input_ids_BxL, question_tokenizer)


def generator_inputs(
    questions: Sequence[str],
    titles_BxK: Sequence[Sequence[str]],
    texts_BxK: Sequence[Sequence[str]],
    generator_tokenizer,
    fmt: ContextFormat,
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask (B*K, max_combined_length), rows ordered question-major like the reference."""
    strings = [
        combine(title, text, question, fmt)
        for question, titles, texts in zip(questions, titles_BxK, texts_BxK)
        for title, text in zip(titles, texts)
    ]
    encoded = generator_tokenizer(
        strings, max_length=fmt.max_combined_length, padding="max_length", truncation=True, return_tensors="np"
    )
    return encoded["input_ids"].astype(np.int32), encoded["attention_mask"].astype(np.int32)


# ------------------------------------------------------------------------------------- on-device assembly


def passage_part(title: str, text: str, fmt: ContextFormat) -> str:
    """The generator-input string of a passage without the question (and without doc_sep's final space)."""
    if fmt.layout != "rag":
        raise ValueError(f"context layout {fmt.layout!r} puts the question first: contexts cannot be glued from "
                         "passage and question parts (use host retrieval with contexts from strings)")
    combined = combine(title, text, "", fmt)
    if not combined.endswith(" ") or combined.endswith("  "):
        raise ValueError(f"doc_sep={fmt.doc_sep!r} must end with exactly one space for on-device assembly")
    return combined[:-1]


def question_part(question: str) -> str:
    return (" " + question).replace("  ", " ")


def table_width(fmt: ContextFormat) -> int:
    """Tokens kept per passage (and per question): all that fit between BOS and EOS when the generator has no BOS."""
    return fmt.max_combined_length - 1


def check_split_tokenization(titles: Sequence[str], texts: Sequence[str], questions: Sequence[str],
                             generator_tokenizer, fmt: ContextFormat,
                             remedy: str = "set --config.retrieval.mode=host") -> None:
    """Raises SplitTokenizationError naming the first (passage, question) whose tokens differ from tokens(passage part) +
    tokens(question part), the premise of on-device assembly; every passage is paired with every question."""
    parts = [passage_part(title, text, fmt) for title, text in zip(titles, texts)]
    q_parts = [question_part(q) for q in questions]
    encode = lambda strings: generator_tokenizer(strings, add_special_tokens=False)["input_ids"]  # noqa: E731
    p_tokens, q_tokens = encode(parts), encode(q_parts)
    for question, q_toks in zip(questions, q_tokens):
        whole = encode([combine(title, text, question, fmt) for title, text in zip(titles, texts)])
        for title, p_toks, w_toks in zip(titles, p_tokens, whole):
            if w_toks != p_toks + q_toks:
                raise SplitTokenizationError(
                    f"the generator tokenizer ({type(generator_tokenizer).__name__}) joins tokens across the "
                    f"passage/question boundary for passage {title!r} and question {question!r}, so on-device "
                    f"context assembly would not give the reference's ids; {remedy}")


def check_split_on_first_passages(index: index_io.Index, generator_tokenizer, fmt: ContextFormat, **remedy) -> None:
    """check_split_tokenization for the index's first 64 passages and PROBE_QUESTIONS (~0.1 s)."""
    first = list(itertools.islice(index.passages.iter_passages(), 64))
    check_split_tokenization([p.title for p in first], [p.text for p in first], PROBE_QUESTIONS, generator_tokenizer,
                             fmt, **remedy)


def question_tokens(questions: Sequence[str], generator_tokenizer, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Generator tokens of each question part (B, width) padded with pad, and their lengths (B,) (cut at width)."""
    encoded = generator_tokenizer([question_part(q) for q in questions], add_special_tokens=False)["input_ids"]
    ids = np.full((len(questions), width), generator_tokenizer.pad_token_id, np.int32)
    lengths = np.zeros((len(questions),), np.int32)
    for i, toks in enumerate(encoded):
        toks = toks[:width]
        ids[i, :len(toks)] = toks
        lengths[i] = len(toks)
    return ids, lengths


def _table_key(store: passage_store.PassageStore, fmt: ContextFormat, generator_tokenizer, width: int) -> str:
    vocab = json.dumps(sorted(generator_tokenizer.get_vocab().items()))
    record = json.dumps([store.metadata["fingerprint"], fmt.title_sep, fmt.doc_sep, fmt.prefix, width,
                         hashlib.sha256(vocab.encode()).hexdigest()])
    return hashlib.sha256(record.encode()).hexdigest()[:12]


def _table_path(index: index_io.Index, generator_tokenizer, fmt: ContextFormat) -> str:
    key = _table_key(index.passages, fmt, generator_tokenizer, table_width(fmt))
    return os.path.join(index.index_dir, f"generator_tokens-{key}.npy")


def passage_table_rows(passages: Sequence[corpus.Passage], generator_tokenizer, fmt: ContextFormat) -> np.ndarray:
    """Rows of the passage token table (see passage_token_table) for `passages`: int32 (N, 1 + table_width)."""
    width = table_width(fmt)
    encoded = generator_tokenizer([passage_part(p.title, p.text, fmt) for p in passages],
                                  add_special_tokens=False)["input_ids"]
    block = np.full((len(passages), 1 + width), generator_tokenizer.pad_token_id, np.int32)
    for i, toks in enumerate(encoded):
        toks = toks[:width]
        block[i, 0] = len(toks)
        block[i, 1:1 + len(toks)] = toks
    return block


def _write_table(path: str, index: index_io.Index, generator_tokenizer, fmt: ContextFormat, batch_size: int):
    shape = (index.num_passages, 1 + table_width(fmt))
    table = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=shape)
    passages = index.passages.iter_passages()
    for start in range(0, index.num_passages, batch_size):
        chunk = list(itertools.islice(passages, batch_size))
        table[start:start + len(chunk)] = passage_table_rows(chunk, generator_tokenizer, fmt)
    table.flush()


def passage_token_table(index: index_io.Index, generator_tokenizer, fmt: ContextFormat, *,
                        batch_size: int = 4096) -> np.ndarray:
    """Every passage's generator tokens: int32 (N, 1 + W), column 0 the length, then W = `table_width(fmt)`
    tokens (pad-filled; longer passages are cut, their question part is cut by the tokenizer anyway).

    Built once into the index directory (generator_tokens-<key>.npy, keyed by corpus, format and tokenizer) and
    returned memory-mapped, so a 21M-passage corpus is tokenised once and each host reads only the rows it needs.
    """
    return _load_or_build_table(_table_path(index, generator_tokenizer, fmt), index, generator_tokenizer, fmt,
                                batch_size)


def _load_or_build_table(path: str, index: index_io.Index, generator_tokenizer, fmt: ContextFormat,
                         batch_size: int = 4096) -> np.ndarray:
    if not os.path.exists(path):
        with files.replaced_when_done(path) as tmp:  # two jobs building the table of one index write their own
            _write_table(tmp, index, generator_tokenizer, fmt, batch_size)
    return np.load(path, mmap_mode="r")


def assemble_contexts(passage_tokens_BxKxW: jax.Array, passage_lengths_BxK: jax.Array, question_tokens_BxQ: jax.Array,
                      question_lengths_B: jax.Array, max_length: int, *, bos: int | None, eos: int, pad: int):
    """`[bos] passage-part question-part eos` truncated to max_length, padded: ids and mask (B, K, max_length).
    bos=None (T5) starts with the passage, as T5's tokenizer adds only EOS."""
    lead = 0 if bos is None else 1
    content = max_length - lead - 1
    width = passage_tokens_BxKxW.shape[-1]
    if width < content:
        passage_tokens_BxKxW = jnp.pad(passage_tokens_BxKxW, ((0, 0), (0, 0), (0, content - width)),
                                       constant_values=pad)
    p_BxKxC = passage_tokens_BxKxW[..., :content]
    j_C = jnp.arange(content)
    lp_BxKx1 = jnp.minimum(passage_lengths_BxK, content)[..., None]
    q_pos = jnp.clip(j_C - lp_BxKx1, 0, question_tokens_BxQ.shape[1] - 1)
    batch, docs = passage_lengths_BxK.shape
    q_BxKxQ = jnp.broadcast_to(question_tokens_BxQ[:, None, :], (batch, docs, question_tokens_BxQ.shape[1]))
    q_BxKxC = jnp.take_along_axis(q_BxKxQ, q_pos, axis=2)
    n_BxKx1 = jnp.minimum(lp_BxKx1 + question_lengths_B[:, None, None], content)
    tokens = jnp.where(j_C < lp_BxKx1, p_BxKxC, q_BxKxC)
    tokens = jnp.where(j_C < n_BxKx1, tokens, pad)
    lead_tokens = [jnp.full((batch, docs, 1), bos, tokens.dtype)] if lead else []
    ids = jnp.concatenate([*lead_tokens, tokens, jnp.full((batch, docs, 1), pad, tokens.dtype)], axis=-1)
    pos_S = jnp.arange(max_length)
    ids = jnp.where(pos_S == n_BxKx1 + lead, eos, ids)
    mask = (pos_S <= n_BxKx1 + lead).astype(jnp.int32)
    return ids.astype(jnp.int32), mask


# ------------------------------------------------------------------------- host contexts from the token table


def host_context_table(index: index_io.Index, generator_tokenizer, fmt: ContextFormat, mode: str,
                       contexts_to_form: int, remedy: str) -> np.ndarray | None:
    """The passage token table host retrieval forms contexts from (`table_generator_inputs`), or None for the
    strings (`generator_inputs`), by `mode` (config_check.HOST_CONTEXTS, eval_nq's --contexts):
      "strings": None.
      "table": the table, built if need be; SplitTokenizationError (ending in `remedy`) for a tokenizer that joins
        tokens across the passage/question boundary (check_split_tokenization on the first passages).
      "auto": the table, except for such a tokenizer, an index directory this job cannot write a missing table
        to, or a missing table that would tokenise more passages than the `contexts_to_form` contexts it saves."""
    if mode == "strings" or (mode == "auto" and fmt.layout != "rag"):
        return None
    if mode not in ("table", "auto"):
        raise ValueError(f"host contexts {mode!r}: choose 'auto', 'table' or 'strings'")
    try:
        check_split_on_first_passages(index, generator_tokenizer, fmt, remedy=remedy)
    except SplitTokenizationError:
        if mode == "table":
            raise
        return None
    path = _table_path(index, generator_tokenizer, fmt)  # (hashes the vocabulary: ~0.2 s for BART's; once)
    if mode == "auto" and not os.path.exists(path) and index.num_passages > contexts_to_form:
        return None
    try:
        return _load_or_build_table(path, index, generator_tokenizer, fmt)
    except OSError:
        if mode == "table":
            raise
        return None


def _wrapping(generator_tokenizer) -> tuple[int | None, int]:
    """(BOS or None, EOS) as the tokenizer wraps a text: BART's `<s> ... </s>`, T5's `... </s>`."""
    empty = generator_tokenizer("")["input_ids"]
    return (empty[0] if len(empty) == 2 else None), empty[-1]


_assemble = jax.jit(assemble_contexts, static_argnames=("max_length", "bos", "eos", "pad"))


def table_generator_inputs(questions: Sequence[str], rows_BxK: np.ndarray, table: np.ndarray, generator_tokenizer,
                           fmt: ContextFormat) -> tuple[np.ndarray, np.ndarray]:
    """`generator_inputs` for the passages at `rows_BxK` of the index, glued from their rows of the passage token
    table and the questions' tokens as on the devices (`assemble_contexts`): the same ids and mask wherever
    check_split_tokenization holds, with only the B question parts tokenised instead of B*K whole contexts (a
    fifth of the host time per batch of eval_nq's)."""
    q_ids, q_lengths = question_tokens(questions, generator_tokenizer, table_width(fmt))
    rows = np.asarray(table[np.asarray(rows_BxK).reshape(-1)]).reshape(*rows_BxK.shape, -1)
    bos, eos = _wrapping(generator_tokenizer)
    ids, mask = _assemble(rows[..., 1:], rows[..., 0], q_ids, q_lengths, max_length=fmt.max_combined_length,
                          bos=bos, eos=eos, pad=generator_tokenizer.pad_token_id)
    return np.asarray(ids).reshape(-1, fmt.max_combined_length), np.asarray(mask).reshape(-1, fmt.max_combined_length)


def make_sharded_gather(mesh: Mesh, corpus_axes: tuple[str, ...]):
    """fn(rows (any shape, replicated), *tables split over corpus_axes on dim 0) -> the rows of each table.

    Every device looks up the requested rows it holds (zeros elsewhere) and a psum over the corpus axes combines
    them: rows.size x row-width values cross the interconnect, never the table.
    """

    def local(rows, *tables):
        n_local = tables[0].shape[0]
        offset = jax.lax.axis_index(corpus_axes) * n_local
        local_rows = rows - offset
        valid = (local_rows >= 0) & (local_rows < n_local)
        safe = jnp.clip(local_rows, 0, n_local - 1)
        outs = []
        for table in tables:
            got = table[safe]
            mask = valid.reshape(valid.shape + (1,) * (got.ndim - valid.ndim))
            outs.append(jax.lax.psum(jnp.where(mask, got, jnp.zeros((), got.dtype)), corpus_axes))
        return tuple(outs)

    def gather(rows, *tables):
        specs = tuple(P(corpus_axes) for _ in tables)
        fn = jax.shard_map(local, mesh=mesh, in_specs=(P(),) + specs, out_specs=tuple(P() for _ in tables),
                           check_vma=False)
        return fn(rows, *tables)

    return gather
