"""Provenance of an answer: which retrieved passage supported it, as JSON-ready rows, and passage snippets.

The posteriors are the reader's (base.Decoded: RAG-Sequence and RAG-Token take marginal.doc_posteriors over the
per-passage log-likelihoods their decoding already computed); this module only lays them out. A record's "provenance" holds
  documents: per retrieved passage, in retrieval order: id, title, prior p(z|x), posterior p(z|x,y);
  tokens: per generated token (start token excluded, end token included): its text and p(z|x,y_t,y_<t) per document
          in the order of `documents` (Figure 2 of the paper).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from rag_jax.retrieval.corpus import Passage


def _softmax(x_K: np.ndarray) -> np.ndarray:
    e = np.exp(x_K - np.max(x_K))
    return e / e.sum()


def entry(
    passages: Sequence[Passage],
    doc_scores_K: np.ndarray,
    answer_posterior_K: np.ndarray,
    token_posterior_LxK: np.ndarray,
    tokens_L: np.ndarray,
    tokenizer,
    pad_token_id: int,
) -> dict[str, Any]:
    """The provenance of one answer. `tokens_L` is the generated sequence (start token first, pad past the end);
    row t of `token_posterior_LxK` belongs to the target tokens_L[t + 1] (rows past the end are dropped)."""
    prior_K = _softmax(np.asarray(doc_scores_K, np.float64))
    generated = [int(t) for t in np.asarray(tokens_L)[1:]]
    rows = [t for t, token in enumerate(generated) if token != pad_token_id]
    return {
        "documents": [
            {"id": p.id, "title": p.title, "prior": float(prior), "posterior": float(posterior)}
            for p, prior, posterior in zip(passages, prior_K, np.asarray(answer_posterior_K))
        ],
        "tokens": [
            {"token": tokenizer.decode([generated[t]]), "posteriors": [float(x) for x in token_posterior_LxK[t]]}
            for t in rows
        ],
    }


def ranked_documents(provenance: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(retrieval rank, document) pairs, highest posterior first."""
    return sorted(enumerate(provenance["documents"]), key=lambda pair: -pair[1]["posterior"])


def snippet(text: str, answer: str, width: int = 200, mark: tuple[str, str] = ("**", "**")) -> str:
    """About `width` characters of `text`, around the first occurrence of `answer` (whole words, any case) with that
    occurrence marked, or the beginning of `text` where the answer does not occur."""
    text = " ".join(text.split())
    answer = " ".join(answer.split())
    found = re.search(r"(?<!\w)" + re.escape(answer) + r"(?!\w)", text, re.IGNORECASE) if answer else None
    if found is None:
        return text if len(text) <= width else text[:width].rstrip() + " …"
    start = max(0, found.start() - (width - len(answer)) // 2)
    end = min(len(text), start + width)
    start = max(0, min(start, end - width))
    marked = text[start : found.start()] + mark[0] + found.group() + mark[1] + text[found.end() : end]
    return ("… " if start > 0 else "") + marked + (" …" if end < len(text) else "")
