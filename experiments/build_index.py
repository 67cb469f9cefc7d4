"""Embeds a passage collection with a document encoder into an index directory (resumable).

  python -m experiments.build_index --encoder=DIR --passages=FILE --output=DIR [--backend=exact|scann]
      [--batch_size=N] [--max_length=N] [--dtype=float32|float16|bfloat16]

--encoder is a Hugging Face DPRContextEncoder (or BERT) directory; --passages a DPR psgs_w100.tsv-style TSV or a
JSONL file of {"id", "title", "text"}. Rerunning the same command after an interruption resumes.
"""

import os

from absl import app, flags

from experiments import cli
from rag_jax import tokenizers
from rag_jax.models import hf
from rag_jax.retrieval import embed

_ENCODER = flags.DEFINE_string("encoder", None, "Document encoder checkpoint directory (DPRContextEncoder).")
_PASSAGES = flags.DEFINE_string("passages", None, "Passages file (.tsv in DPR layout or .jsonl).")
_OUTPUT = flags.DEFINE_string("output", None, "Index directory to write (created; resumed if it exists).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "Tokenizer directory; default: the encoder directory if it has one, else bert-base-uncased."
)
_BACKEND = flags.DEFINE_enum("backend", "exact", ["exact", "scann"], "Also build a ScaNN searcher with 'scann'.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Passages per encoder call.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 256, "Maximum tokens of title + text.")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 100_000, "Passages per embeddings shard file.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16", "bfloat16"], "Storage dtype of embeddings.")
flags.mark_flags_as_required(["encoder", "passages", "output"])


def tokenizer_for(encoder_dir: str, override: str | None):
    if override:
        return tokenizers.load_question_tokenizer(override)
    has_own = any(os.path.exists(os.path.join(encoder_dir, f)) for f in ("tokenizer.json", "vocab.txt"))
    return tokenizers.load_question_tokenizer(encoder_dir if has_own else tokenizers.QUESTION_TOKENIZER_DIR)


def main(argv):
    del argv

    def build():
        encoder = hf.load_encoder(_ENCODER.value)
        tokenizer = tokenizer_for(_ENCODER.value, _TOKENIZER.value)
        if len(tokenizer) > encoder.config.vocab_size:
            raise cli.UsageError(
                f"tokenizer has {len(tokenizer)} entries but the encoder's vocabulary has "
                f"{encoder.config.vocab_size}; pass the encoder's own tokenizer with --tokenizer"
            )
        index = embed.build_index(
            encoder.config, encoder.params, tokenizer, _PASSAGES.value, _OUTPUT.value,
            batch_size=_BATCH_SIZE.value, max_length=_MAX_LENGTH.value, shard_size=_SHARD_SIZE.value,
            dtype=_DTYPE.value, backend=_BACKEND.value,
        )  # fmt: skip
        print(f"index: {_OUTPUT.value} ({index.num_passages} passages x {index.dim}, encoder {index.encoder_id})")

    cli.run(build)


if __name__ == "__main__":
    app.run(main)
