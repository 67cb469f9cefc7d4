"""Small training tasks and configs for the training tests (tests/test_train*.py)."""

from __future__ import annotations

import itertools
import json
import os
from typing import Any, Sequence

import ml_collections

from experiments.configs import nq
from rag_jax.data import nq_open
from rag_jax.retrieval import corpus

from tests import process_env

MINI_PASSAGES = nq.BUNDLED_PASSAGES


def bundled_questions(count: int, start: int = 0) -> list[dict[str, Any]]:
    return [ex for _, ex in nq_open.read_nq_jsonl(nq_open.MINI_QUESTIONS)][start:start + count]


def write_questions(path: str, examples: Sequence[dict[str, Any]]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex) + "\n")
    return path


def write_bundled_task(directory: str, num_questions: int = 32, num_distractors: int = 32,
                       max_words: int | None = None) -> dict[str, str]:
    """The first `num_questions` bundled questions, their gold passages and `num_distractors` other passages
    (texts cut to `max_words` words when given)."""
    questions = bundled_questions(num_questions)
    gold = {str(ex["gold_passage_id"]) for ex in questions}
    passages, others = [], 0
    for p in corpus.read_passages(MINI_PASSAGES):
        if p.id in gold or others < num_distractors:
            others += p.id not in gold
            text = p.text if max_words is None else " ".join(p.text.split()[:max_words])
            passages.append(corpus.Passage(p.id, p.title, text))
    os.makedirs(directory, exist_ok=True)
    passages_path = os.path.join(directory, "passages.tsv")
    corpus.write_passages_tsv(passages_path, passages)
    return {"questions": write_questions(os.path.join(directory, "questions.jsonl"), questions),
            "passages": passages_path}


def tiny_config(task: dict[str, str], **overrides) -> ml_collections.ConfigDict:
    """The `tiny` variant on `task`; overrides are dotted field names ("train.steps") -> values."""
    c = nq.get_config("tiny")
    c.task.train_file = task["questions"]
    c.task.dev_file = task["questions"]
    c.data.passages = task["passages"]
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return c


def cli_overrides(task: dict[str, str], **overrides) -> list[str]:
    """The same as tiny_config, as experiments.train_nq command-line flags."""
    flags = ["--config=" + os.path.join(os.path.dirname(nq.__file__), "nq.py") + ":tiny",
             f"--config.task.train_file={task['questions']}", f"--config.task.dev_file={task['questions']}",
             f"--config.data.passages={task['passages']}"]
    return flags + [f"--config.{key}={value}" for key, value in overrides.items()]


def bundled_english(count: int = 300) -> list[str]:
    """The texts of the first `count` bundled NQ-open passages: enough distinct English words for a
    small_bart_tokenizer of 1,200 entries where a task's own text has too few."""
    return [p.text for p in itertools.islice(corpus.read_passages(MINI_PASSAGES), count)]


SMALL_VOCAB = 1200  # small_bart_tokenizer's entries


def small_generator_fields(tokenizer: str) -> dict[str, Any]:
    """Config fields (dotted names -> values) of a generator that reads small_bart_tokenizer's vocabulary."""
    return {"tokenizers.generator": tokenizer, "model.generator.vocab_size": SMALL_VOCAB}


def small_bart_tokenizer(texts: Sequence[str], directory: str, vocab_size: int = SMALL_VOCAB) -> str:
    """A byte-level BPE tokenizer in BART's layout (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4) trained on `texts`:
    a generator vocabulary 40x smaller than bart-large's, so that a test can train a generator in seconds (the output
    layer over 50,265 entries is most of a small BART's work)."""
    import tokenizers as hf_tokenizers  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    bpe = hf_tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    os.makedirs(directory, exist_ok=True)
    bpe.save_model(directory)  # vocab.json + merges.txt, which BartTokenizerFast.from_pretrained reads
    transformers.BartTokenizerFast.from_pretrained(directory).save_pretrained(directory)
    return directory


def skip_without_pretrained_retriever() -> None:
    """Skips the calling test where all-MiniLM-L6-v2's files (the local configs' retriever) are not installed."""
    import pytest  # pylint: disable=g-import-not-at-top

    from rag_jax.models import sentence_transformers_dir  # pylint: disable=g-import-not-at-top

    try:
        sentence_transformers_dir.pretrained_retriever_dir()
    except sentence_transformers_dir.CheckpointError as e:
        pytest.skip(str(e))


def _generator_targets(task, records: Sequence[dict]) -> list[str]:
    """The KILT records' targets as the generator is trained on them, for its tokenizer's texts: a classification
    task's label words (fact verification's " supports", not the dataset's "SUPPORTS": trained on the latter, the
    BPE split each label word into 4-6 pieces, the RAG paper maps each label to one token), with the leading space
    the pipeline gives a BART target (config data.answer_prefix_space); other tasks' answers as written."""
    answers = [o["answer"] for r in records for o in r["output"]]
    if not task.labels:
        return answers
    return [" " + task.example({"input": "claim", "outputs": [answer]}, "train")["answers"][0] for answer in answers]


def run_small_knowledge_demo(root, passage_text, question_text, flags: Sequence[str], timeout: int,
                             family: str = "qa", entities: int = 240, heldout: int = 30):
    """`experiments.knowledge_demo` in its own process on a small knowledge task (`entities` people, `heldout` held
    out, seed 11) written under `root` (as task `family` of rag_jax/data/knowledge_families.py in KILT's format when
    it is not "qa"), with a 1,200-entry BPE vocabulary trained on its passages, inputs and targets as the reader
    writes them (`passage_text(passage)`, `question_text(example)`) and the shared training recipe (200 denoising
    steps, 300 steps at K=1) plus `flags`. Returns knowledge_demo.json and the demo's stdout."""
    import subprocess  # pylint: disable=g-import-not-at-top
    import sys  # pylint: disable=g-import-not-at-top

    from rag_jax.data import knowledge_families, knowledge_task  # pylint: disable=g-import-not-at-top
    from rag_jax.tasks import registry  # pylint: disable=g-import-not-at-top

    task = knowledge_families.make_task(family, entities, heldout, seed=11)
    knowledge_task.write_task(task, str(root / "task"))
    texts = [passage_text(p) for p in task.passages + task.swapped_passages]
    if family == "qa":
        texts += [question_text(e) for e in task.train + task.dev]
    else:  # the family's inputs and targets replace the questions
        records = knowledge_families.family_records(task, family)
        knowledge_families.write_family(task, family, str(root / "task"))
        texts += [question_text({"question": r["input"]}) for r in records["train"] + records["dev"]]
        texts += _generator_targets(registry.get(family), records["train"])
    tokenizer = small_bart_tokenizer(texts, str(root / "tokenizer"))
    files = {name: str(root / "task" / f"{name}.jsonl") for name in ("passages", "swapped_passages")}
    files.update({"train_file": str(root / "task" / "train.jsonl"), "dev_file": str(root / "task" / "dev.jsonl"),
                  "swapped_dev_file": str(root / "task" / "swapped_dev.jsonl")})
    workdir = root / "demo"
    command = [sys.executable, "-m", "experiments.knowledge_demo", f"--workdir={workdir}", "--examples=2",
               f"--task={family}", *(f"--{name}={path}" for name, path in files.items()),
               *(f"--config.{name}={value}" for name, value in small_generator_fields(tokenizer).items()),
               "--config.denoise.steps=200", "--config.denoise.learning_rate=2e-3", "--config.train.steps=300",
               "--config.optim.warmup_steps=30", "--config.train.checkpoint_every=300", "--config.model.n_docs=1",
               "--config.eval.n_docs=1", "--config.eval.recall_ks=1", "--n_docs_sweep=1,2,4", *flags]
    root_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(command, cwd=root_dir, capture_output=True, text=True, timeout=timeout,
                          env=process_env.command_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(workdir / "knowledge_demo.json") as f:
        return json.load(f), done.stdout
