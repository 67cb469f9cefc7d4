"""The start-up checks of a run config (experiments/configs/nq.py): every field's type and range, the combinations
that cannot work, and the paths it names. They need nothing but the config and the filesystem, and this module
imports nothing heavy, so `train_nq` refuses a bad config before jax or a model loads. Each check fails with a
`ConfigError` naming the field, the value and what is allowed.

Each field's type and range are config_fields.py's (check_fields); this module checks the combinations.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import ml_collections

from rag_jax.readers import registry as readers
from rag_jax.retrieval import code_spec as codes_lib
from rag_jax.runs import encoder_training
# The field rules, and the names the rest of the code reaches through this module.
from rag_jax.runs.config_fields import (AUTO_POOLING, DOC_ENCODER, HOST_CONTEXTS, RULES, ConfigError,  # noqa: F401
                                        check_fields, field_error, get_field, task_file)



def _check_sizes(config: ml_collections.ConfigDict) -> None:
    """Combinations of the encoders' sizes that cannot work (those of random-init networks; a checkpoint's are
    checked when it loads). The generator's are its architecture's (registry entry `check_run_config`, which
    build.check_config runs once jax has loaded)."""
    m = config.model
    for part in ("question_encoder", "doc_encoder"):
        c = m[part]
        if c.init == "random" and c.hidden_size % c.num_heads:
            raise ConfigError(f"config model.{part}.hidden_size={c.hidden_size} is not divisible by model.{part}."
                              f"num_heads={c.num_heads}; attention heads split the width evenly")
    for field, part in (("data.max_question_length", "question_encoder"), ("index.max_length", "doc_encoder")):
        positions = m[part].max_position_embeddings
        if m[part].init == "random" and m.init_from_rag is None and get_field(config, field) > positions:
            raise ConfigError(f"config {field}={get_field(config, field)} exceeds model.{part}.max_position_embeddings="
                              f"{positions}; lower it or give the model more positions")


# ADist's scores (Atlas's attention mass divided by 256) are ~1e-2 and differ between passages by less: from this
# temperature up, softmax(score / T) is within a few percent of uniform and q(x) learns almost nothing
# (docs/retriever_losses.md).
ADIST_MAX_TEMPERATURE = 0.1


def _check_retriever_loss(config: ml_collections.ConfigDict) -> None:
    """The retriever losses' needs: ADist a FiD reader's cross-attention and a temperature of its scores' scale,
    LOOP two passages to leave one out."""
    loss = get_field(config, "train.retriever_loss", "marginal")
    reader = readers.configured_name(config.model)
    if loss == "adist" and reader != "fid":
        raise ConfigError(f"config train.retriever_loss='adist' distils the FiD decoder's cross-attention over the "
                          f"passages, which model.reader={reader!r} does not have: set --config.model.reader=fid or "
                          "another --config.train.retriever_loss (pdist, emdr2, loop, marginal)")
    temperature = get_field(config, "train.retriever_temperature", 1.0)
    if loss == "adist" and temperature >= ADIST_MAX_TEMPERATURE:
        raise ConfigError(f"config train.retriever_temperature={temperature} with train.retriever_loss='adist': its "
                          "attention scores are ~1e-2 (Atlas divides them by 256), so the target is near uniform and "
                          "q(x) learns almost nothing; set --config.train.retriever_temperature=0.01 (Atlas's "
                          "temperature_gold) or lower (docs/retriever_losses.md)")
    if loss == "loop" and config.model.n_docs < 2:
        raise ConfigError(f"config train.retriever_loss='loop' leaves one passage out, which needs model.n_docs >= "
                          f"2 (got {config.model.n_docs}); raise --config.model.n_docs or use pdist")


def require_path(value, field: str, what: str, *, directory: bool) -> str:
    """`value`, which config `field` names, if it is an existing file (or directory)."""
    if value is None:
        raise ConfigError(f"config {field} is not set: give {what} (e.g. --config.{field}=/path)")
    check = os.path.isdir if directory else os.path.isfile
    if not check(value):
        kind = "directory" if directory else "file"
        found = "a file" if os.path.isfile(value) else "a directory" if os.path.isdir(value) else None
        raise ConfigError(f"config {field}={value!r}: " + (f"is {found}; give {what}" if found else
                                                            f"no such {kind} ({what})"))
    return value


def check_config(config: ml_collections.ConfigDict) -> None:
    """Value checks that need no devices or files beyond the paths named in the config."""
    check_fields(config)
    m, t = config.model, config.train
    task_name = get_field(config, "task.name", "qa")
    (train_field, train_file), (dev_field, dev_file) = task_file(config, "train"), task_file(config, "dev")
    if task_name != "qa" and (train_file is None or (t.eval_every and dev_file is None)):
        raise ConfigError(f"config task.name={task_name!r} reads its examples from task.train_file and "
                          "task.dev_file (the built-in data.source is NQ-open); set both")
    if config.retrieval.host_searcher == "scann" and config.index.backend != "scann":
        raise ConfigError("config retrieval.host_searcher='scann' needs index.backend='scann' (the searcher is built "
                          "with the index)")
    codes = config.index.get("codes", "")  # (absent from configs saved before it)
    if codes:
        try:
            codes_lib.parse_spec(codes, "config index.codes")
        except codes_lib.CodesError as e:
            raise ConfigError(str(e) + " (or '' for none)") from None
    if config.retrieval.host_searcher == "codes" and not codes:
        raise ConfigError("config retrieval.host_searcher='codes' needs index.codes ('int8' or 'pq:M'): the codes are "
                          "built with the index")
    if config.retrieval.stale_prefetch and config.retrieval.mode != "host":
        raise ConfigError(f"config retrieval.stale_prefetch=True needs retrieval.mode='host' (mode "
                          f"{config.retrieval.mode!r} retrieves inside the step, with the current parameters); "
                          "set --config.retrieval.stale_prefetch=false")
    if t.global_batch_size % t.grad_accum_steps:
        raise ConfigError(f"config train.global_batch_size={t.global_batch_size} is not divisible by "
                          f"train.grad_accum_steps={t.grad_accum_steps}")
    if config.retrieval.mode == "device" and readers.configured_name(m) == "fid":
        raise ConfigError("config model.reader='fid' with retrieval.mode='device': FiD's passages start with the "
                          "question, which on-device assembly (passage tokens, then question tokens) cannot glue; "
                          "set --config.retrieval.mode=host")
    if config.retrieval.mode == "device" and not m.doc_sep.endswith(" "):
        raise ConfigError(f"config model.doc_sep={m.doc_sep!r}: device retrieval assembles passage and question "
                          "tokens separately, which matches the tokenizer only when doc_sep ends with a space")
    refreshes = any(every for _, _, every in refresh_schedule(get_field(config, "index.refresh_every", "0")))
    problem = encoder_training.combination_problem(config, refreshes)  # encoder training, reranking, refreshes
    if problem:
        raise ConfigError(problem)
    _check_retriever_loss(config)
    _check_sizes(config)
    require_path(config.data.passages, "data.passages", "the passages file (DPR psgs_w100.tsv layout)",
                  directory=False)
    for field, value in ((train_field, train_file), (dev_field, dev_file)):
        if value is not None:
            require_path(value, field, "a JSONL questions file", directory=False)
    if train_file is None or dev_file is None:
        if config.data.data_dir is not None:
            require_path(config.data.data_dir, "data.data_dir", "the TFDS data directory (create it, or leave it "
                          "unset for TFDS's default)", directory=True)
        if config.data.source == "official":
            require_path(config.data.manual_dir, "data.manual_dir",
                          "the directory holding NQ-open.train.jsonl and NQ-open.dev.jsonl, or set task.train_file "
                          "and task.dev_file", directory=True)
    for field in ("tokenizers.question", "tokenizers.generator"):
        require_path(config.tokenizers.get(field.split(".")[1]), field, "a tokenizer directory", directory=True)
    if m.init_from_rag is None:
        for part in ("question_encoder", "generator"):
            init = m[part].init
            if init != "random" and not (part == "question_encoder" and init == DOC_ENCODER):
                require_path(init, f"model.{part}.init", "'random' or a Hugging Face checkpoint directory",
                              directory=True)
    else:
        require_path(m.init_from_rag, "model.init_from_rag", "a Hugging Face RAG checkpoint directory", directory=True)
    if m.doc_encoder.init != "random":
        require_path(m.doc_encoder.init, "model.doc_encoder.init", "'random' or a BERT/DPR checkpoint directory",
                      directory=True)
    if config.index.dir is not None:
        require_path(config.index.dir, "index.dir", "a prebuilt index directory", directory=True)


def refresh_schedule(value) -> list[tuple[int, int | None, int]]:
    """config index.refresh_every as (first step, end step or None, every) ranges; every 0: no refresh there.

    "500" (or 500): every 500 steps; "0": never; "0-1000:500,1000-:2000": every 500 steps before step 1000, every
    2000 from then on (Atlas's notation). Steps count from 0; a refresh is due after step s when s is a positive
    multiple of the `every` of the range holding s.
    """
    field = "index.refresh_every"
    text = str(value).strip()
    if isinstance(value, bool):
        raise field_error(field, value, "must be a step count or a schedule such as '0-1000:500,1000-:2000'")
    if text.isdigit():
        return [(0, None, int(text))]
    ranges = []
    for part in text.split(","):
        span, _, every = part.strip().partition(":")
        start, dash, stop = span.partition("-")
        if not (dash and start.strip().isdigit() and every.strip().isdigit()
                and (stop.strip().isdigit() or not stop.strip())):
            raise field_error(field, value, f"cannot read {part.strip()!r}: write a step count, or ranges START-END:EVERY "
                                      "separated by commas, the last one open (e.g. '0-1000:500,1000-:2000')")
        ranges.append((int(start), int(stop) if stop.strip() else None, int(every)))
    for (_, stop, _), (start, _, _) in zip(ranges, ranges[1:]):
        if stop != start:
            raise field_error(field, value, f"the ranges must follow each other: one ends at {stop}, the next starts at "
                                      f"{start}")
    if ranges[0][0] != 0 or ranges[-1][1] is not None:
        raise field_error(field, value, "the ranges must start at step 0 and the last one must be open ('1000-:2000')")
    if any(stop is not None and stop <= start for start, stop, _ in ranges):
        raise field_error(field, value, "each range must end after it starts")
    return ranges


def check_retriever_config(config: ml_collections.ConfigDict) -> None:
    """train_retriever's config (experiments/configs/retriever.py): fields, sizes and the paths it names."""
    check_fields(config)
    d, m = config.data, config.model
    for part in ("question_encoder", "doc_encoder"):
        c = m[part]
        if c.init == "random" and c.hidden_size % c.num_heads:
            raise ConfigError(f"config model.{part}.hidden_size={c.hidden_size} is not divisible by model.{part}."
                              f"num_heads={c.num_heads}; attention heads split the width evenly")
        if c.init == "random" and max(d.max_question_length, d.max_passage_length) > c.max_position_embeddings:
            raise ConfigError(f"config data.max_question_length / data.max_passage_length exceed model.{part}."
                              f"max_position_embeddings={c.max_position_embeddings}")
        if c.init != "random" and not (part == "doc_encoder" and m.shared_encoder):
            require_path(c.init, f"model.{part}.init", "'random' or a BERT/DPR checkpoint directory", directory=True)
    require_path(d.passages, "data.passages", "the passages file (DPR psgs_w100.tsv layout or JSONL)",
                 directory=False)
    if not m.train_doc_encoder and (m.shared_encoder or d.kind != "gold"):
        raise ConfigError(f"config model.train_doc_encoder=False freezes the document encoder, which needs "
                          f"model.shared_encoder=False (now {m.shared_encoder}) and data.kind='gold' (now "
                          f"{d.kind!r}: its passages are rows of data.passages); change one of them")
    if d.kind == "dpr":
        require_path(d.train_file, "data.train_file", "DPR's training JSON (e.g. biencoder-nq-train.json)",
                     directory=False)
    for field in ("data.train_file", "data.dev_file", "data.hard_negatives"):
        value = d.get(field.split(".")[1])
        if value is not None:
            require_path(value, field, "a data file", directory=False)
    require_path(config.tokenizers.question, "tokenizers.question", "a tokenizer directory", directory=True)


def check_workdir(workdir: str) -> None:
    """A run directory must be a directory (or not exist yet, with a directory to create it in)."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir} is a file; give a directory (new, or a run's to resume it)")
    parent = os.path.dirname(os.path.abspath(workdir))
    if not os.path.exists(workdir) and os.path.exists(parent) and not os.path.isdir(parent):
        raise ConfigError(f"--workdir={workdir}: {parent} is a file, not a directory")


def differences(saved: dict[str, Any], config: ml_collections.ConfigDict, prefixes: Sequence[str]) -> list[str]:
    """'field: saved -> now' for the fields under `prefixes` whose values differ between a saved config (JSON, as in
    a checkpoint) and `config`; fields only one of them has are left out."""
    now = json.loads(config.to_json_best_effort())
    flat_saved, flat_now = _flatten(saved), _flatten(now)
    chosen = [k for k in sorted(flat_saved) if any(k == p or k.startswith(p + ".") for p in prefixes)]
    return [f"{k}={flat_saved[k]!r} there, {flat_now[k]!r} now" for k in chosen
            if k in flat_now and flat_saved[k] != flat_now[k]]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out
