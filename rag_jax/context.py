"""Generator inputs from retrieved passages, formed exactly as Hugging Face's `RagRetriever.postprocess_docs`.

Per (question, passage): `prefix + title + title_sep + text + doc_sep + question`, with one leading and one
trailing `"` stripped from the title and every double space replaced once by a single space (Python's
non-overlapping `str.replace`, as the reference does). The question is not the raw string but the question-encoder
ids decoded back with `skip_special_tokens=True` (lower-cased WordPiece text for BERT). The generator tokenizer
pads to `max_combined_length` and truncates the end, so a long passage pushes the question out: a reference quirk
kept for parity.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class ContextFormat:
    title_sep: str = " / "
    doc_sep: str = " // "
    max_combined_length: int = 300
    prefix: str = ""


def combine(title: str, text: str, question: str, fmt: ContextFormat) -> str:
    title = title.removeprefix('"').removesuffix('"')
    return (fmt.prefix + title + fmt.title_sep + text + fmt.doc_sep + question).replace("  ", " ")


def decode_questions(question_input_ids_BxL: np.ndarray, question_tokenizer) -> list[str]:
    """The question strings the reference conditions the generator on."""
    return question_tokenizer.batch_decode(np.asarray(question_input_ids_BxL).tolist(), skip_special_tokens=True)


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
