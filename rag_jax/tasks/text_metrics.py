"""Metrics of generated text, from maintained libraries where they exist: BLEU-1 (sacrebleu), ROUGE-L (rouge-score),
and Q-BLEU-1, which has no package (Nema & Khapra, 2018).

Settings (the RAG paper does not state them; these are the libraries' defaults, said here so that figures compare):
- BLEU-1: sacrebleu's BLEU with max_ngram_order=1, tokenize="13a" (the WMT tokenizer), cased, one or more references
  per prediction (the closest reference length for the brevity penalty). Corpus BLEU: an example's statistics are
  its matched and total unigrams and its hypothesis / closest-reference lengths; their sums over the corpus give
  sacrebleu's corpus_score exactly (`bleu1_of_sums`, sacrebleu's compute_bleu with its default "exp" smoothing, which
  with one n-gram order only matters when no unigram matches).
- ROUGE-L: rouge-score's RougeScorer(["rougeL"]) F-measure, its default tokenizer (lower case, runs of [a-z0-9]),
  no stemming; with several references, the best one (rouge-score's score_multi).
- Q-BLEU-1: `qbleu1` below.
"""

from __future__ import annotations

import functools
import re
from typing import Mapping, Sequence

BLEU_STATISTICS = ("bleu1_matches", "bleu1_total", "bleu1_sys_len", "bleu1_ref_len")


@functools.cache
def _bleu1():
    from sacrebleu.metrics import BLEU  # pylint: disable=g-import-not-at-top (only tasks with BLEU load it)

    return BLEU(max_ngram_order=1, tokenize="13a", effective_order=True)


@functools.cache
def _rouge():
    from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def bleu1_statistics(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """The summable BLEU-1 statistics (BLEU_STATISTICS) of one prediction against its references."""
    score = _bleu1().sentence_score(prediction, list(references))
    return dict(zip(BLEU_STATISTICS, map(float, (score.counts[0], score.totals[0], score.sys_len, score.ref_len))))


def bleu1_of_sums(sums: Mapping[str, float]) -> float:
    """Corpus BLEU-1 (0-100) of summed `bleu1_statistics`."""
    from sacrebleu.metrics import BLEU  # pylint: disable=g-import-not-at-top

    return BLEU.compute_bleu([int(sums["bleu1_matches"])], [int(sums["bleu1_total"])], int(sums["bleu1_sys_len"]),
                             int(sums["bleu1_ref_len"]), smooth_method="exp", max_ngram_order=1).score


def sentence_bleu1(prediction: str, references: Sequence[str]) -> float:
    """BLEU-1 of one prediction, in [0, 1]."""
    return _bleu1().sentence_score(prediction, list(references)).score / 100.0


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure in [0, 1], the best over the references."""
    return _rouge().score_multi(list(references), prediction)["rougeL"].fmeasure


# ---------------------------------------------------------------------------------------------------------------
# Q-BLEU-1: Preksha Nema and Mitesh M. Khapra, "Towards a Better Metric for Evaluating Question Generation Systems",
# EMNLP 2018 (arXiv:1808.10192), section 4. A question is answerable when it keeps the words that say what is asked:
# its named entities, its question word, its content words; function words matter least. For each category i,
# with l_i(S) the words of sentence S in that category and h(w, S) = 1 when w occurs in S:
#   P = sum_i w_i * |{w in l_i(hyp): h(w, ref)}| / |l_i(hyp)|
#   R = sum_i w_i * |{w in l_i(ref): h(w, hyp)}| / |l_i(ref)|
#   Answerability = 2 P R / (P + R)        Q-BLEU = delta * Answerability + (1 - delta) * BLEU   (sum_i w_i = 1)
# with BLEU-1 here (Q-BLEU-1). A category with no words in the sentence it is measured on counts fully (nothing
# in it can be missed). The weights are parameters: the paper fits them per dataset to human judgements; the
# defaults are those of the authors' released scorer's example command (ner 0.6, question type 0.2, relevant
# content 0.1, function words 0.1 by difference, delta 0.7). Named entities are found without an NER model: words
# written with a capital letter that do not start the sentence, and numbers (an approximation of the paper's
# NER tagger, stated so). Checked against the authors' released scorer (github.com/PrekshaNema25/Answerability-Metric,
# answerability_score.py): its README command is where the defaults come from; it scores each category separately
# (the F of BLEU-1 between the category's words of both sentences, BLEU-1's brevity penalty included) and weights
# those Fs, where the paper's formula above weights precision and recall first; it also counts the word after
# "what"/"which" as part of the question type. The paper's formula is kept. The RAG paper states neither weights nor
# scorer for its Jeopardy Q-BLEU-1 (22.2), so figures here compare with each other, not with that number.

QUESTION_WORDS = frozenset("what which who whom whose when where why how".split())
FUNCTION_WORDS = frozenset(
    "a an the of in on at to for from by with about as into than then and or but if is are was were be been being "
    "this that these those it its he she they them his her their him we us our you your i me my do does did has "
    "have had not no so such there here".split())
QBLEU_WEIGHTS = {"named_entity": 0.6, "question_word": 0.2, "content": 0.1, "function": 0.1}
QBLEU_DELTA = 0.7
_WORD = re.compile(r"\w+", re.UNICODE)


def word_categories(sentence: str) -> dict[str, set[str]]:
    """The lower-cased words of `sentence` by Q-BLEU category (each word in exactly one)."""
    out: dict[str, set[str]] = {name: set() for name in QBLEU_WEIGHTS}
    for position, match in enumerate(_WORD.finditer(sentence)):
        word, lower = match.group(), match.group().lower()
        if lower in QUESTION_WORDS:
            out["question_word"].add(lower)
        elif (position > 0 and word[0].isupper()) or word.isdigit():
            out["named_entity"].add(lower)
        elif lower in FUNCTION_WORDS:
            out["function"].add(lower)
        else:
            out["content"].add(lower)
    return out


def _weighted_coverage(source: dict[str, set[str]], other_words: set[str], weights: Mapping[str, float]) -> float:
    return sum(w * (len(source[c] & other_words) / len(source[c]) if source[c] else 1.0) for c, w in weights.items())


def answerability(prediction: str, reference: str, weights: Mapping[str, float] = QBLEU_WEIGHTS) -> float:
    """Nema & Khapra's Answerability of a predicted question against one reference, in [0, 1]."""
    hyp, ref = word_categories(prediction), word_categories(reference)
    hyp_words, ref_words = set().union(*hyp.values()), set().union(*ref.values())
    precision = _weighted_coverage(hyp, ref_words, weights)
    recall = _weighted_coverage(ref, hyp_words, weights)
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def qbleu1(prediction: str, references: Sequence[str], weights: Mapping[str, float] = QBLEU_WEIGHTS,
           delta: float = QBLEU_DELTA) -> float:
    """Q-BLEU-1 in [0, 1]: delta * Answerability + (1 - delta) * BLEU-1, the best over the references."""
    return max(delta * answerability(prediction, ref, weights) + (1 - delta) * sentence_bleu1(prediction, [ref])
               for ref in references)
