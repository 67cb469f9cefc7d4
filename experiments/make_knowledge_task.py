"""Writes an invented-entities knowledge task (rag_jax/data/knowledge_task.py) as the files knowledge_demo reads.

  python -m experiments.make_knowledge_task --output=DIR [--schema=companies] [--entities=400] [--heldout=50] \\
      [--task=qa|abstractive_qa|question_generation|fact_verification] [--format=nq|kilt] [--overwrite]
  python -m experiments.knowledge_demo --workdir=W --passages=DIR/passages.tsv --train_file=DIR/train.jsonl \\
      --dev_file=DIR/dev.jsonl --swapped_passages=DIR/swapped_passages.tsv --swapped_dev_file=DIR/swapped_dev.jsonl

Passages are written in DPR's TSV layout (id, text, title), questions as NQ-open JSONL with "gold_passage_id": the
same files a knowledge base of one's own would be. --format=kilt writes the questions as KILT JSON-lines instead, with
each record's page as provenance, for any --task (rag_jax/data/knowledge_families.py: the same facts asked as each
of the paper's task families); --task other than qa needs it.
"""

import os

from absl import app, flags

from experiments import cli, output_checks
from rag_jax.data import knowledge_families, knowledge_task
from rag_jax.retrieval import corpus

SCHEMAS = {"people": knowledge_task.PEOPLE, "companies": knowledge_task.COMPANIES}
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write the five files into.", required=True)
_SCHEMA = flags.DEFINE_enum("schema", "companies", sorted(SCHEMAS), "What the entities are (people: make run's task).")
_ENTITIES = flags.DEFINE_integer("entities", 400, "Entities, one passage each.", lower_bound=2)
_HELDOUT = flags.DEFINE_integer("heldout", 50, "Held-out entities (the dev questions ask about them).", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "The task is a function of this seed.")
_TASK = flags.DEFINE_enum("task", "qa", knowledge_families.FAMILIES, "What the questions ask (the task family).")
_FORMAT = flags.DEFINE_enum("format", "nq", ["nq", "kilt"], "Questions as NQ-open JSONL or KILT JSON-lines.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the task files of an existing --output.")

FILES = ("passages.tsv", "swapped_passages.tsv", "train.jsonl", "dev.jsonl", "swapped_dev.jsonl")


def write() -> None:
    if _TASK.value != "qa" and _FORMAT.value != "kilt":
        raise cli.UsageError(f"--task={_TASK.value} is written in KILT's format only; add --format=kilt")
    if _HELDOUT.value >= _ENTITIES.value:
        raise cli.UsageError(f"--heldout={_HELDOUT.value} must be below --entities={_ENTITIES.value}")
    cli.check_new_output(_OUTPUT.value, "--output", overwrite=_OVERWRITE.value, directory=True)
    output_checks.refuse_foreign_directory(_OUTPUT.value, "--output", FILES, "knowledge task (no train.jsonl, ...)")
    cli.declare_outputs(_OUTPUT.value)
    task = knowledge_families.make_task(_TASK.value, _ENTITIES.value, _HELDOUT.value, seed=_SEED.value,
                                        schema=SCHEMAS[_SCHEMA.value])
    directory = _OUTPUT.value
    paths = knowledge_task.write_task(task, directory)
    for name in ("passages", "swapped_passages"):  # JSONL -> DPR's TSV layout
        tsv = os.path.join(directory, f"{name}.tsv")
        corpus.write_passages_tsv(tsv, list(corpus.read_passages(paths[name])))
        os.remove(paths[name])
    if _FORMAT.value == "kilt":  # the NQ-open question files give way to the family's KILT files
        knowledge_families.write_family(task, _TASK.value, directory, seed=_SEED.value)
    print(f"wrote {_ENTITIES.value} {_SCHEMA.value} ({_HELDOUT.value} held out, task {_TASK.value}, {_FORMAT.value} "
          f"format) to {directory}: {', '.join(FILES)}")


if __name__ == "__main__":
    app.run(cli.main_running(write), flags_parser=cli.parse_flags)
