"""KILT's provenance scores (Petroni et al., 2021, "KILT: a Benchmark for Knowledge Intensive Language Tasks",
section 4.2; the KILT repository's kilt/eval_retrieval.py and kilt/eval_downstream.py).

A page is a Wikipedia page, named here by its title (the passage file's `title` column; KILT's own ids are
`wikipedia_id`s, and a record's provenance carries both). R-Precision of one example: for each gold provenance set
(one per output that has provenance), R = its number of distinct pages, and the score is the fraction of the first R
distinct retrieved pages that are in the set; the example's R-Precision is the maximum over its sets. The KILT
variants of a downstream score (KILT-EM, KILT-F1, KILT-AC, KILT-RL) count an example's score only when its
R-Precision is 1, so a system scores only when it both answered and found the page that justifies the answer.
(base.summarize averages both over the examples that have gold pages.)
"""

from __future__ import annotations

from typing import Sequence


def distinct_pages(pages: Sequence[str]) -> list[str]:
    """The retrieved pages in rank order with repeats removed (several passages of one page count as one page)."""
    seen: dict[str, None] = {}
    for page in pages:
        seen.setdefault(page.strip(), None)
    return list(seen)


def r_precision(retrieved_pages: Sequence[str], gold_sets: Sequence[Sequence[str]]) -> float:
    """R-Precision in [0, 1] of ranked `retrieved_pages` against the gold provenance sets (max over the sets); 0.0
    when no set names a page."""
    ranked = distinct_pages(retrieved_pages)
    best = 0.0
    for gold in gold_sets:
        gold_pages = {page.strip() for page in gold}
        if gold_pages:
            best = max(best, sum(page in gold_pages for page in ranked[: len(gold_pages)]) / len(gold_pages))
    return best
