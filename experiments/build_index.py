"""Embeds a passage collection with a document encoder into an index directory (resumable).

  python -m experiments.build_index --encoder=DIR --passages=FILE --output=DIR [--backend=exact|scann]
      [--batch_size=N] [--max_length=N] [--dtype=float32|float16|bfloat16]

--encoder is a Hugging Face DPRContextEncoder, BERT or sentence-transformers (e.g. all-MiniLM-L6-v2: mean pooling,
L2-normalised vectors) directory; --passages a DPR psgs_w100.tsv-style TSV or a JSONL file of {"id", "title",
"text"}. Rerunning the same command after an interruption resumes.

Several hosts: on a multi-host TPU slice every worker runs the same command (jax.distributed finds its peers;
elsewhere pass --coordinator_address, --num_processes and --process_id); each host embeds and writes only its own
rows of --output (a shared filesystem or each host's own disk). Without a JAX job, --num_hosts=H --host_index=h
builds host h's part alone (separate machines, or one machine running h = 0..H-1 in turn); the run that
completes the last part writes index.json.
"""

import os

from absl import app, flags

from experiments import cli, input_checks, model_loading, output_checks

_ENCODER = flags.DEFINE_string("encoder", None, "Document encoder checkpoint directory (DPRContextEncoder, BERT or "
                                "sentence-transformers).")
_PASSAGES = flags.DEFINE_string("passages", None, "Passages file (.tsv in DPR layout or .jsonl).")
_OUTPUT = flags.DEFINE_string("output", None, "Index directory to write (created; resumed if it exists).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "Tokenizer directory; default: the encoder directory if it has one, else bert-base-uncased."
)
_BACKEND = flags.DEFINE_enum("backend", "exact", ["exact", "scann"], "Also build a ScaNN searcher with 'scann'.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Passages per encoder call.", lower_bound=1)
_MAX_LENGTH = flags.DEFINE_integer("max_length", 256, "Maximum tokens of title + text.", lower_bound=1)
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 100_000, "Passages per embeddings shard file.", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16", "bfloat16"], "Storage dtype of embeddings.")
_HOST_INDEX = flags.DEFINE_integer("host_index", None, "Build only this host's part (with --num_hosts), no JAX job.",
                                   lower_bound=0)
_NUM_HOSTS = flags.DEFINE_integer("num_hosts", None, "Hosts the index is split over; default: the JAX job's processes.",
                                  lower_bound=1)
_DEVICES_PER_HOST = flags.DEFINE_integer(
    "devices_per_host", None, "Accelerators per host of the job that will load the index; default: this host's.",
    lower_bound=1)
cli.define_distributed_flags()
flags.mark_flags_as_required(["encoder", "passages", "output"])


def _check_flags() -> None:
    """What the flags alone can tell, before anything loads."""
    if (_HOST_INDEX.value is None) != (_NUM_HOSTS.value is None):
        raise cli.UsageError("--host_index and --num_hosts go together (or leave both to the JAX job)")
    if _HOST_INDEX.value is not None and _HOST_INDEX.value >= _NUM_HOSTS.value:
        raise cli.UsageError(f"--host_index={_HOST_INDEX.value} must be below --num_hosts={_NUM_HOSTS.value} (hosts "
                             "are numbered from 0)")
    # (--encoder and --tokenizer may be hub ids: their loaders check them)
    input_checks.require_file(_PASSAGES.value, "--passages", "a passages file: .tsv in DPR's layout or .jsonl")
    output_checks.refuse_input_as_output(_OUTPUT.value, "--output", {
        "--passages": _PASSAGES.value, "--encoder": _ENCODER.value, "--tokenizer": _TOKENIZER.value})
    from rag_jax.retrieval import index_io, index_writer  # pylint: disable=g-import-not-at-top (numpy only)

    index_writer.refuse_foreign_directory(_OUTPUT.value)
    recorded = index_io.read_metadata(_OUTPUT.value) if os.path.isdir(_OUTPUT.value) else None
    for flag, field in ((_MAX_LENGTH, "max_length"), (_DTYPE, "dtype"), (_SHARD_SIZE, "shard_size")):
        if recorded is not None and field in recorded and recorded[field] != flag.value:
            raise cli.UsageError(
                f"--{flag.name}={flag.value}, but {_OUTPUT.value} holds an index built with "
                f"{field}={recorded[field]!r}; rerun with --{flag.name}={recorded[field]} to resume it, or give a new "
                "--output")


def build():
    _check_flags()
    from rag_jax.models import hf  # pylint: disable=g-import-not-at-top (after the flag checks)
    from rag_jax.retrieval import embed  # pylint: disable=g-import-not-at-top

    if _HOST_INDEX.value is None:
        cli.init_distributed()
    encoder = hf.load_encoder(_ENCODER.value)
    input_checks.check_length(_MAX_LENGTH.value, encoder.config, f"--max_length={_MAX_LENGTH.value}",
                              f"the encoder --encoder={_ENCODER.value}")
    cli.declare_outputs(_OUTPUT.value)
    tokenizer = model_loading.encoder_tokenizer(_ENCODER.value, _TOKENIZER.value)
    if len(tokenizer) > encoder.config.vocab_size:
        raise cli.UsageError(
            f"tokenizer has {len(tokenizer)} entries but the encoder's vocabulary has "
            f"{encoder.config.vocab_size}; pass the encoder's own tokenizer with --tokenizer"
        )
    index = embed.build_index(
        encoder.config, encoder.params, tokenizer, _PASSAGES.value, _OUTPUT.value,
        batch_size=_BATCH_SIZE.value, max_length=_MAX_LENGTH.value, shard_size=_SHARD_SIZE.value,
        dtype=_DTYPE.value, backend=_BACKEND.value, all_hosts=_HOST_INDEX.value is None,
        host_index=_HOST_INDEX.value, num_hosts=_NUM_HOSTS.value, devices_per_host=_DEVICES_PER_HOST.value,
    )  # fmt: skip
    if index is not None:
        print(f"index: {_OUTPUT.value} ({index.num_passages} passages x {index.dim}, encoder {index.encoder_id})")


if __name__ == "__main__":
    app.run(cli.main_running(build), flags_parser=cli.parse_flags)
