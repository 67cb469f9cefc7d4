"""Host-side retrieval for RAG, the counterpart of Hugging Face's RagRetriever: question vectors -> top-K passages
-> their precomputed embeddings and the generator inputs formed from them (and, for end-to-end training, the
passages' document-encoder tokens, as RagRetriever returns them after `set_ctx_encoder_tokenizer`)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from rag_jax.retrieval import code_search, contexts, corpus, embed, exact, index_io, merge, scann_backend


@dataclasses.dataclass
class Retrieved:
    """K passages for each of B questions, best first."""

    rows_BxK: np.ndarray  # int32 rows of the index
    scores_BxK: np.ndarray  # float32 search scores q·d
    doc_embeds_BxKxD: np.ndarray  # float32 document embeddings of the rows
    passages: list[list[corpus.Passage]]
    context_input_ids_BKxS: np.ndarray  # generator inputs, question-major rows
    context_attention_mask_BKxS: np.ndarray
    # Document-encoder tokens of the passages (title, text pairs as build_index tokenises them), question-major rows
    # (B*K, L): {"doc_input_ids", "doc_attention_mask", "doc_token_type_ids"}; None unless the Retriever has a
    # `doc_tokenizer` (end-to-end training embeds them again with the current document encoder).
    doc_tokens: dict[str, np.ndarray] | None = None

    @property
    def doc_ids(self) -> list[list[str]]:
        return [[p.id for p in row] for row in self.passages]


def make_searcher(index: index_io.Index, backend: str = "exact", rerank_from_codes: int = 0) -> merge.Searcher:
    """Exact inner-product search on the default device, the ScaNN searcher saved in the index directory, or
    search on the index's codes ("codes") with an exact re-rank of the best `rerank_from_codes` candidates. Rows an
    update removed are never returned; ScaNN built before an --add is joined with exact search of the new rows."""
    if backend == "codes":
        return code_search.CodeSearcher(index, rerank_from_codes)
    if backend == "exact":
        searcher = exact.ExactSearcher(index)
    elif backend == "scann":
        base_rows = (index.metadata.get("update") or {}).get("base_rows", index.num_passages)
        if base_rows == index.num_passages and not index.metadata.get("update"):
            searcher = scann_backend.load_scann_index(index)
        else:  # the searcher of the root directory covers the rows before the first --add
            searcher = code_search.AppendedSearcher(scann_backend.load_base_scann(index, base_rows), index) \
                if base_rows < index.num_passages else scann_backend.load_base_scann(index, base_rows)
    else:
        raise ValueError(f"retrieval backend must be 'exact', 'scann' or 'codes', got {backend!r}")
    return code_search.MaskedSearcher(searcher, index) if len(index.removed_rows) else searcher


@dataclasses.dataclass
class _Searched:
    """What a retriever searches: one object shared with its with_own_tokenizers copies, so that moving a retriever
    to a new index (an index refresh) moves its copies in other threads too."""

    index: index_io.Index
    searcher: merge.Searcher | None


class Retriever:
    def __init__(
        self,
        index: index_io.Index,
        question_tokenizer,
        generator_tokenizer,
        fmt: contexts.ContextFormat,
        backend: str = "exact",
        *,
        doc_tokenizer=None,
        doc_max_length: int | None = None,
        passage_table: np.ndarray | None = None,
        rerank_from_codes: int = 0,
    ):
        """doc_tokenizer, doc_max_length: return each passage's document-encoder tokens too, truncated to and padded
        to doc_max_length (a fixed length: the training step compiles once; [PAD] columns change no pooled vector).
        passage_table: the index's passage token table (contexts.host_context_table): the generator inputs are glued
        from its rows (contexts.table_generator_inputs: the same ids, less host time) instead of tokenised strings.
        rerank_from_codes: with backend "codes", the candidates re-ranked exactly (make_searcher)."""
        self._searched = _Searched(index, make_searcher(index, backend, rerank_from_codes))
        self.doc_tokenizer, self.doc_max_length = doc_tokenizer, doc_max_length
        self.passage_table = passage_table
        self.question_tokenizer = question_tokenizer
        self.generator_tokenizer = generator_tokenizer
        self.format = fmt

    @property
    def index(self) -> index_io.Index:
        return self._searched.index

    @index.setter
    def index(self, index: index_io.Index) -> None:
        self._searched.index = index

    @property
    def searcher(self) -> merge.Searcher:
        return self._searched.searcher

    @searcher.setter
    def searcher(self, searcher: merge.Searcher) -> None:
        self._searched.searcher = searcher

    def __call__(self, q_BxD, question_input_ids_BxL: np.ndarray, n_docs: int,
                 questions: list[str] | None = None) -> Retrieved:
        """`questions`: the question ids decoded back to text, when the caller already has them."""
        q_BxD = np.asarray(q_BxD, np.float32)
        rows, scores = self.searcher.search(q_BxD, n_docs)
        return self.gather(rows, scores, question_input_ids_BxL, questions)

    def gather(self, rows_BxK: np.ndarray, scores_BxK: np.ndarray, question_input_ids_BxL,
               questions: list[str] | None = None) -> Retrieved:
        flat = rows_BxK.reshape(-1)
        embeds = self.index.gather_rows(flat)
        found = self.index.passages.get(flat)
        batch, k = rows_BxK.shape
        passages = [found[i * k : (i + 1) * k] for i in range(batch)]
        if questions is None:
            questions = contexts.decode_questions(question_input_ids_BxL, self.question_tokenizer)
        if self.passage_table is not None:
            ids, mask = contexts.table_generator_inputs(questions, rows_BxK, self.passage_table,
                                                        self.generator_tokenizer, self.format)  # fmt: skip
        else:
            ids, mask = contexts.generator_inputs(
                questions,
                [[p.title for p in row] for row in passages],
                [[p.text for p in row] for row in passages],
                self.generator_tokenizer,
                self.format,
            )
        return Retrieved(
            rows_BxK=rows_BxK.astype(np.int32),
            scores_BxK=scores_BxK.astype(np.float32),
            doc_embeds_BxKxD=embeds.reshape(batch, k, -1),
            passages=passages,
            context_input_ids_BKxS=ids,
            context_attention_mask_BKxS=mask,
            doc_tokens=None if self.doc_tokenizer is None else self.doc_tokens(found),
        )

    def doc_tokens(self, passages: list[corpus.Passage]) -> dict[str, np.ndarray]:
        """The passages' (title, text) pairs as the document encoder reads them, (N, doc_max_length) int32 each."""
        length = self.doc_max_length
        encoded = embed.tokenize_passages(self.doc_tokenizer, passages, len(passages), length)
        return {f"doc_{key}": np.pad(array, ((0, 0), (0, length - array.shape[1])))
                for key, array in encoded.items()}
    def with_own_tokenizers(self) -> Retriever:
        """This retriever (the same index and searcher, and moved with it to a new one) with copies of its
        tokenizers, for use in another thread: a fast tokenizer keeps its truncation and padding settings in one
        shared Rust object, so two threads calling the same one can tokenise with each other's settings."""
        other = copy.copy(self)
        other.question_tokenizer = copy.deepcopy(self.question_tokenizer)
        other.generator_tokenizer = copy.deepcopy(self.generator_tokenizer)
        other.doc_tokenizer = copy.deepcopy(self.doc_tokenizer)
        return other


class RandomPassages(Retriever):
    """A closed-book control: K passages drawn at random for every question (the same draws for a given seed),
    formed into generator inputs exactly as retrieved ones would be. A model that answers well from these has
    memorised its answers instead of reading them."""

    def __init__(self, retriever: Retriever, seed: int = 0):  # pylint: disable=super-init-not-called (no searcher)
        self._searched, self.format = _Searched(retriever.index, None), retriever.format
        self.doc_tokenizer, self.doc_max_length = retriever.doc_tokenizer, retriever.doc_max_length
        self.question_tokenizer, self.generator_tokenizer = retriever.question_tokenizer, retriever.generator_tokenizer
        self.passage_table = retriever.passage_table
        self._rng = np.random.default_rng(seed)

    def __call__(self, q_BxD, question_input_ids_BxL: np.ndarray, n_docs: int,
                 questions: list[str] | None = None) -> Retrieved:
        rows = np.stack([self._rng.choice(self.index.num_passages, n_docs, replace=False) for _ in range(len(q_BxD))])
        # The doc scores are the model's own q(x)·d(z) for these passages (the answering code computes them).
        return self.gather(rows, np.zeros(rows.shape, np.float32), question_input_ids_BxL, questions)
