"""Tokenizer loading for RAG: BERT WordPiece (DPR question/context encoders) and the generator's, BART byte-level BPE
or T5 SentencePiece (a directory with spiece.model, or a T5 tokenizer.json; `train_sentencepiece` makes a small one).

Tokenizers are read from local directories in the Hugging Face layout; a hub id (e.g. "facebook/bart-large") is
passed through to `from_pretrained` and needs a network. The defaults are the copies bundled under
`rag_jax/assets/tokenizers/`, so nothing here needs a download.

Why the care: in transformers 5, `BertTokenizer(vocab_file=...)` silently builds a tokenizer with an empty
vocabulary (only the special tokens), and call-time `add_prefix_space=True` is silently ignored. Every loader
therefore goes through `from_pretrained` and then checks that the vocabulary is really there.
"""

import json
import os
import re
from typing import Iterable, NamedTuple

import numpy as np
import transformers

from rag_jax.models import registry, sentence_transformers_dir

_ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tokenizers")
QUESTION_TOKENIZER_DIR = os.path.join(_ASSETS_DIR, "bert-base-uncased")
GENERATOR_TOKENIZER_DIR = os.path.join(_ASSETS_DIR, "bart-large")

# RagTokenizer.save_pretrained writes the two tokenizers into these subfolders of a RAG checkpoint directory.
RAG_QUESTION_SUBDIR = "question_encoder_tokenizer"
RAG_GENERATOR_SUBDIR = "generator_tokenizer"

# Either a serialised fast tokenizer (tokenizer.json) or the raw vocabulary files must be present.
_BERT_FILE_SETS = (("tokenizer.json",), ("vocab.txt",))

# Below this many entries a vocabulary is surely a broken load (the real ones have 30,522 and 50,265).
_MIN_VOCAB_SIZE = 1000

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

_WHERE_TO_GET = (
    "Point to a directory holding the tokenizer files (e.g. a RagTokenizer/BertTokenizer/BartTokenizer "
    "save_pretrained output), or use the bundled defaults from rag_jax.data.tokenizers.default_tokenizer_dirs()."
)


class RagTokenizers(NamedTuple):
    """The two tokenizers a RAG model needs."""

    question: transformers.PreTrainedTokenizerBase  # BERT WordPiece: question (and context) encoder input.
    generator: transformers.PreTrainedTokenizerBase  # BART byte-level BPE or T5 SentencePiece: generator input, labels.


def default_tokenizer_dirs() -> dict[str, str]:
    """Paths of the bundled tokenizer directories: {'question': bert-base-uncased, 'generator': bart-large}."""
    return {"question": QUESTION_TOKENIZER_DIR, "generator": GENERATOR_TOKENIZER_DIR}


def _check_local_dir(path: str, file_sets: tuple[tuple[str, ...], ...], what: str) -> None:
    """Raises a clear error unless `path` is a directory holding one of the complete `file_sets`."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} tokenizer directory {path!r} does not exist. {_WHERE_TO_GET}")
    for files in file_sets:
        if all(os.path.isfile(os.path.join(path, f)) for f in files):
            return
    # Name the files missing from the most complete alternative, so the message points at the actual gap.
    wanted = " or ".join(" + ".join(fs) for fs in file_sets)
    best = max(file_sets, key=lambda fs: sum(os.path.isfile(os.path.join(path, f)) for f in fs))
    missing = [f for f in best if not os.path.isfile(os.path.join(path, f))]
    gap = f"lacks {', '.join(missing)}" if len(missing) < len(best) else "has no tokenizer files"
    raise FileNotFoundError(
        f"{what} tokenizer directory {path!r} {gap} (needs {wanted}; found {sorted(os.listdir(path))}). "
        f"{_WHERE_TO_GET}"
    )


def _is_hub_id(path: str) -> bool:
    return not os.path.exists(path) and not os.path.isabs(path) and bool(_HUB_ID_RE.match(path))


class TokenizerError(ValueError):
    """A tokenizer directory whose files do not load; the message names the file and what to do."""


def _check_vocab(tok: transformers.PreTrainedTokenizerBase, path: str, probe: str, what: str) -> None:
    """Guards against tokenizers that loaded with an empty vocabulary (only special tokens)."""
    size = len(tok.get_vocab())
    probe_ids = tok.convert_tokens_to_ids([probe])
    if size < _MIN_VOCAB_SIZE or probe_ids[0] in (None, tok.unk_token_id):
        raise TokenizerError(
            f"{what} tokenizer loaded from {path!r} has a vocabulary of {size} entries and maps {probe!r} to "
            f"{probe_ids[0]} (unk is {tok.unk_token_id}): the vocabulary did not load. Check the vocabulary "
            "files in that directory."
        )


def _damaged_file(path: str) -> str | None:
    """'FILE: what is wrong' for the first JSON file of a tokenizer directory that does not parse, else None."""
    for name in sorted(os.listdir(path)):
        if name.endswith(".json"):
            try:
                with open(os.path.join(path, name), encoding="utf-8") as f:
                    json.load(f)
            except (ValueError, UnicodeDecodeError) as e:  # (JSONDecodeError is a ValueError)
                return f"{os.path.join(path, name)}: not valid JSON ({e})"
    return None


def _load(cls, path: str, file_sets, probe: str, what: str):
    path = os.fspath(path)
    if not _is_hub_id(path):
        _check_local_dir(path, file_sets, what)
    try:
        tok = cls.from_pretrained(path)
    except Exception as e:  # pylint: disable=broad-except (damaged files fail inside transformers in many ways)
        damaged = _damaged_file(path) if os.path.isdir(path) else None
        cause = damaged or f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise TokenizerError(f"{what} tokenizer does not load: {cause}; restore the tokenizer files (copy them "
                             "again, or save_pretrained the tokenizer there)") from e
    _check_vocab(tok, path, probe, what)
    return tok


def load_question_tokenizer(path: str = QUESTION_TOKENIZER_DIR) -> transformers.PreTrainedTokenizerBase:
    """BERT WordPiece tokenizer (lower-casing, as bert-base-uncased / DPR) from a directory or hub id.

    The directory needs tokenizer.json or vocab.txt; tokenizer_config.json, when present, sets lower-casing etc.
    A sentence-transformers directory gives the tokenizer of its Transformer module. Pairs (title, text) get
    token_type_ids 0 then 1, as the DPR context encoder expects.
    """
    pipeline = sentence_transformers_dir.read_pipeline(path) if os.path.isdir(path) else None
    if pipeline is not None:
        path = pipeline.transformer_dir
    return _load(transformers.BertTokenizerFast, path, _BERT_FILE_SETS, "the", "Question encoder (BERT)")


def generator_tokenizer_kind(path: str) -> registry.TokenizerKind:
    """The tokenizer family (rag_jax/models/registry.py TokenizerKind) of the generator tokenizer at `path`: the one a
    generator architecture recognises there (T5's SentencePiece: spiece.model, a T5 tokenizer_config.json, a hub id
    naming t5), else BART's byte-level BPE. A path that is neither a directory nor a hub id gets BART's (its loader
    then says it is missing)."""
    path = os.fspath(path)
    return registry.tokenizer_kind(path if os.path.isdir(path) or _is_hub_id(path) else "")


def load_generator_tokenizer(path: str = GENERATOR_TOKENIZER_DIR) -> transformers.PreTrainedTokenizerBase:
    """The generator's tokenizer from a directory or hub id: BART byte-level BPE (<s>=0, <pad>=1, </s>=2,
    <mask>=50264; tokenizer.json or vocab.json + merges.txt) or T5 SentencePiece (<pad>=0, </s>=1, <unk>=2, no BOS,
    100 <extra_id_*> sentinels at the top; spiece.model or tokenizer.json)."""
    kind = generator_tokenizer_kind(path)
    return _load(getattr(transformers, kind.cls), path, kind.file_sets, kind.probe, kind.what)


def decoder_labels(tokenizer, texts: list[str], *, max_length: int | None = None, padding="max_length"):
    """Decoder inputs (B, L) int32 for target `texts`, which are also the labels (targets = these shifted left).

    BART: the tokenizer's `<s> text </s>` (the reference's fine-tuning data). T5 has no BOS: `<pad> text </s>`, the
    decoder start (pad) first, as the reference research project's finetune_rag.py builds T5's decoder inputs, so
    that the first token of the text is a target too. `max_length` counts the start token."""
    starts_with_pad = tokenizer.bos_token_id is None
    length = None if max_length is None else max_length - starts_with_pad
    ids = tokenizer(texts, max_length=length, truncation=max_length is not None, padding=padding)["input_ids"]
    ids = np.asarray(ids, np.int32).reshape(len(texts), -1)
    if starts_with_pad:
        ids = np.concatenate([np.full((len(texts), 1), tokenizer.pad_token_id, np.int32), ids], axis=1)
    return ids


def train_sentencepiece(texts: Iterable[str], directory: str, vocab_size: int = 1000):
    """Trains a unigram SentencePiece model with T5's special ids (pad 0, eos 1, unk 2, no BOS) on `texts` and
    saves it as a T5 tokenizer in `directory`: a stand-in for T5's own where none can be downloaded (tests, tiny
    local runs). Returns the tokenizer, `vocab_size` + 100 sentinel tokens."""
    import sentencepiece

    os.makedirs(directory, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=os.path.join(directory, "spiece"), vocab_size=vocab_size,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram", character_coverage=1.0, num_threads=1,
        minloglevel=2,
    )  # fmt: skip
    tokenizer = load_generator_tokenizer(directory)
    os.remove(os.path.join(directory, "spiece.vocab"))
    tokenizer.save_pretrained(directory)
    return tokenizer


def load_rag_tokenizers(path: str | None = None) -> RagTokenizers:
    """Both tokenizers from a RAG checkpoint directory (RagTokenizer.save_pretrained layout), or the defaults.

    `path` must contain `question_encoder_tokenizer/` and `generator_tokenizer/`; None gives the bundled
    bert-base-uncased and bart-large tokenizers.
    """
    if path is None:
        return RagTokenizers(load_question_tokenizer(), load_generator_tokenizer())
    path = os.fspath(path)
    if _is_hub_id(path):
        # RagTokenizer knows the hub layout; we split it into our pair.
        rag = transformers.RagTokenizer.from_pretrained(path)
        return RagTokenizers(rag.question_encoder, rag.generator)
    missing = [d for d in (RAG_QUESTION_SUBDIR, RAG_GENERATOR_SUBDIR) if not os.path.isdir(os.path.join(path, d))]
    if missing:
        found = sorted(os.listdir(path)) if os.path.isdir(path) else "directory does not exist"
        raise FileNotFoundError(
            f"RAG tokenizer directory {path!r} lacks the subfolder(s) {', '.join(m + '/' for m in missing)} "
            f"(found: {found}). "
            "Expected the RagTokenizer.save_pretrained layout; load the two tokenizers separately with "
            "load_question_tokenizer / load_generator_tokenizer otherwise."
        )
    return RagTokenizers(
        load_question_tokenizer(os.path.join(path, RAG_QUESTION_SUBDIR)),
        load_generator_tokenizer(os.path.join(path, RAG_GENERATOR_SUBDIR)),
    )
