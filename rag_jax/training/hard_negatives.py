"""Hard negatives mined from an existing index, for train_retriever (experiments.mine_negatives writes them): each
question's top passages that contain none of its answers and are not its gold passage. DPR takes its hard negatives
from BM25's top passages without an answer; a dense index of a previous retriever plays that part here (as in DPR's
and ANCE's later rounds)."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from rag_jax.inference import metrics
from rag_jax.models import hf
from rag_jax.retrieval import embed, exact, index_io


def mine(index: index_io.Index, encoder: hf.Loaded, tokenizer, questions: Sequence[dict[str, Any]], *,
         negatives: int = 1, depth: int = 100, batch_size: int = 64, max_length: int = 32
         ) -> Iterator[dict[str, Any]]:
    """{"question", "negative_ids"} per question (at most `negatives` ids, best-ranked first, from the top `depth`);
    questions are NQ-open examples {"question", "answers", "gold_passage_id"}."""
    searcher = exact.ExactSearcher(index.embeddings(dtype=np.float32))
    depth = min(depth, index.num_passages)
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        vectors = embed.embed_questions(encoder.config, encoder.params, tokenizer, [q["question"] for q in chunk],
                                        batch_size, max_length)
        rows, _ = searcher.search(vectors, depth)
        for example, ranked in zip(chunk, rows):
            found = []
            for row in ranked:
                passage = index.passages[int(row)]
                if passage.id == str(example.get("gold_passage_id")) or metrics.has_answer(example["answers"],
                                                                                            passage.text):
                    continue
                found.append(passage.id)
                if len(found) == negatives:
                    break
            yield {"question": example["question"], "negative_ids": found}
