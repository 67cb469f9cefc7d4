"""Embeds a passage collection with a document encoder into an index directory (resumable), compresses it, updates it.

  python -m experiments.build_index --encoder=DIR --passages=FILE --output=DIR [--backend=exact|scann]
      [--batch_size=N] [--max_length=N] [--dtype=float32|float16|bfloat16] [--codes=int8|pq:M]
  python -m experiments.build_index --output=DIR --codes=int8|pq:M [--codes_sample=N --codes_seed=S]  # add codes
  python -m experiments.build_index --output=DIR --encoder=DIR --add=PASSAGES    # embed and append new passages
  python -m experiments.build_index --output=DIR --remove=IDS_FILE               # mask passages (ids, one a line)
  python -m experiments.build_index --output=DIR --compact                       # drop the masked rows

--codes keeps compressed codes beside the full-precision vectors (docs/index.md): int8 (per-row scaled 8-bit) or
pq:M (product quantisation, M bytes a passage, codebooks trained on --codes_sample rows drawn with --codes_seed).
--add, --remove and --compact write a new version of the index, published atomically (rag_jax/retrieval/
index_update.py); rerun after an interruption to resume.

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
_PASSAGES = flags.DEFINE_string("passages", None, "Passages file (.tsv in DPR layout or .jsonl) to build from.")
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
_CODES = flags.DEFINE_string("codes", None, "Also store compressed codes: 'int8' or 'pq:M' (M sub-vectors).")
_CODES_SAMPLE = flags.DEFINE_integer("codes_sample", 16_384, "pq: rows the codebooks are trained on.", lower_bound=256)
_CODES_SEED = flags.DEFINE_integer("codes_seed", 0, "pq: seed of the training sample and k-means start.", lower_bound=0)
_ADD = flags.DEFINE_string("add", None, "Passages file to embed and append to the index at --output.")
_REMOVE = flags.DEFINE_string("remove", None, "File of passage ids (one a line) to remove from the index at --output.")
_COMPACT = flags.DEFINE_bool("compact", False, "Rewrite the index at --output without its removed passages.")
cli.define_distributed_flags()
flags.mark_flags_as_required(["output"])


def _mode() -> str:
    """build, codes (codes for an existing index), add, remove or compact, from the flags given."""
    given = [name for name, on in (("--passages", _PASSAGES.value), ("--add", _ADD.value),
                                   ("--remove", _REMOVE.value), ("--compact", _COMPACT.value)) if on]
    if len(given) > 1:
        raise cli.UsageError(f"{' and '.join(given)} go in separate runs: give one of --passages (build), --add, "
                             "--remove, --compact")
    if not given:
        if _CODES.value is None:
            raise cli.UsageError("give --passages (build an index), --add, --remove, --compact, or --codes (add codes "
                                 "to the index at --output)")
        return "codes"
    return {"--passages": "build", "--add": "add", "--remove": "remove", "--compact": "compact"}[given[0]]


def _check_update_flags(mode: str):
    """An update (or codes for an existing index) needs a complete index at --output; returns its metadata."""
    from rag_jax.retrieval import code_spec as codes, index_io  # pylint: disable=g-import-not-at-top (no jax)

    spec = None if _CODES.value is None else codes.parse_spec(_CODES.value)
    if mode == "build":
        return spec
    recorded = index_io.read_metadata(_OUTPUT.value) if os.path.isdir(_OUTPUT.value) else None
    if recorded is None or not recorded.get("complete"):
        raise cli.UsageError(f"--output={_OUTPUT.value} holds no complete index; build one with --passages first")
    if mode in ("add", "remove") and not os.path.isfile(getattr(flags.FLAGS, mode)):
        raise cli.UsageError(f"--{mode}={getattr(flags.FLAGS, mode)}: no such file")
    if mode == "add" and _ENCODER.value is None:
        raise cli.UsageError("--add embeds the new passages: give the index's document encoder with --encoder")
    if spec is not None:
        if mode != "codes":
            raise cli.UsageError(f"--codes goes in a run of its own (or with --passages), not with --{mode}: an update "
                                 "encodes its rows with the index's own codes")
        spec.check_dim(recorded["dim"])
        if recorded.get("codes") and recorded["codes"]["spec"] != str(spec):
            raise cli.UsageError(f"--codes={spec}, but {_OUTPUT.value} already holds {recorded['codes']['spec']} "
                                 "codes; build into a new --output for other codes")
    return spec


def _check_flags() -> None:
    """What the flags alone can tell, before anything loads."""
    if _ENCODER.value is None and _PASSAGES.value is not None:
        raise cli.UsageError("--passages needs the document encoder to embed them with: give --encoder")
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
    mode = _mode()
    spec = _check_update_flags(mode)
    if mode != "build":
        return _update(mode, spec)
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
    if spec is not None:
        spec.check_dim(encoder.config.output_dim)
    index = embed.build_index(
        encoder.config, encoder.params, tokenizer, _PASSAGES.value, _OUTPUT.value,
        batch_size=_BATCH_SIZE.value, max_length=_MAX_LENGTH.value, shard_size=_SHARD_SIZE.value,
        dtype=_DTYPE.value, backend=_BACKEND.value, all_hosts=_HOST_INDEX.value is None,
        host_index=_HOST_INDEX.value, num_hosts=_NUM_HOSTS.value, devices_per_host=_DEVICES_PER_HOST.value,
    )  # fmt: skip
    if index is not None and spec is not None:
        from rag_jax.retrieval import index_codes  # pylint: disable=g-import-not-at-top

        index = index_codes.write_codes(index, spec, sample_size=_CODES_SAMPLE.value, seed=_CODES_SEED.value)
    if index is not None:
        print(f"index: {_OUTPUT.value} ({index.num_passages} passages x {index.dim}, encoder {index.encoder_id})")


def _update(mode: str, spec) -> None:
    """--codes for an existing index, --add, --remove or --compact."""
    from rag_jax.retrieval import index_codes, index_io, index_update  # pylint: disable=g-import-not-at-top

    if mode == "codes":
        index = index_codes.write_codes(index_io.load_index(_OUTPUT.value), spec, sample_size=_CODES_SAMPLE.value,
                                        seed=_CODES_SEED.value)
    elif mode == "remove":
        index = index_update.remove_passages(_OUTPUT.value, _REMOVE.value)
    elif mode == "compact":
        index = index_update.compact(_OUTPUT.value)
    else:
        index = index_update.add_passages(_OUTPUT.value, _ADD.value, *_embedder(index_io.read_metadata(_OUTPUT.value)))
    live = index.num_passages - len(index.removed_rows)
    print(f"index: {_OUTPUT.value} ({live} passages x {index.dim}, version "
          f"{(index.metadata.get('update') or {}).get('version', 0)}, codes {index_codes.spec_of(index.metadata)})")


def _embedder(recorded: dict):
    """(embed_fn, identity) of --encoder with the tokenizer and length the index at --output was built with."""
    from rag_jax.models import hf  # pylint: disable=g-import-not-at-top (after the flag checks)
    from rag_jax.retrieval import embed  # pylint: disable=g-import-not-at-top

    encoder = hf.load_encoder(_ENCODER.value)
    tokenizer = model_loading.encoder_tokenizer(_ENCODER.value, _TOKENIZER.value)
    max_length = int(recorded.get("max_length", _MAX_LENGTH.value))
    identity = {"encoder_id": embed.encoder_fingerprint(encoder.config, encoder.params),
                **embed.index_identity(encoder.config, tokenizer, max_length)}
    encode = embed.make_encode_fn(encoder.config)
    return (lambda passages: embed.embed_passages(encode, encoder.params, tokenizer, passages, _BATCH_SIZE.value,
                                                  max_length)), identity


if __name__ == "__main__":
    app.run(cli.main_running(build), flags_parser=cli.parse_flags)
