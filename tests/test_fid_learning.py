"""The fid reader learns to read: `experiments.knowledge_demo --config.model.reader=fid` end to end on a small version
of the bundled knowledge task (tests/test_knowledge_learning.py is RAG-Sequence's). Held-out questions ask about
entities the training never mentioned, so exact match far above the closed-book control (random passages) and the
index hot-swap followed show that the decoder reads the retrieved passages through the fused encoder outputs; reading
more passages than it was trained with must not make its answers worse. A small BPE vocabulary trained on the task's
text keeps the output layer cheap (tests/train_task.small_bart_tokenizer)."""

import json
import os
import subprocess
import sys

import pytest

from rag_jax.data import knowledge_task
from rag_jax.models import sentence_transformers_dir
from tests import train_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    try:
        sentence_transformers_dir.pretrained_retriever_dir()
    except sentence_transformers_dir.CheckpointError as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("fid_knowledge")
    task = knowledge_task.make_task(240, 30, seed=11)
    knowledge_task.write_task(task, str(root / "task"))
    texts = [f"title: {p['title']} context: {p['text']}" for p in task.passages + task.swapped_passages]
    texts += [f"question: {e['question']}" for e in task.train + task.dev]
    tokenizer = train_task.small_bart_tokenizer(texts, str(root / "tokenizer"))
    files = {name: str(root / "task" / f"{name}.jsonl") for name in ("passages", "swapped_passages")}
    files.update({"train_file": str(root / "task" / "train.jsonl"), "dev_file": str(root / "task" / "dev.jsonl"),
                  "swapped_dev_file": str(root / "task" / "swapped_dev.jsonl")})
    workdir = root / "demo"
    command = [sys.executable, "-m", "experiments.knowledge_demo", f"--workdir={workdir}", "--examples=2",
               *(f"--{name}={path}" for name, path in files.items()),
               f"--config.tokenizers.generator={tokenizer}", "--config.model.generator.vocab_size=1200",
               "--config.model.reader=fid", "--config.retrieval.mode=host", "--config.model.fid.passage_length=64",
               "--config.denoise.steps=200", "--config.denoise.learning_rate=2e-3", "--config.train.steps=300",
               "--config.optim.warmup_steps=30", "--config.train.checkpoint_every=300", "--config.model.n_docs=2",
               "--config.eval.n_docs=2", "--config.eval.recall_ks=2", "--n_docs_sweep=1,2,4"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(workdir / "knowledge_demo.json") as f:
        return json.load(f), done.stdout, root


@pytest.mark.slow
def test_fid_answers_held_out_questions_by_reading_the_retrieved_passages(demo):
    results, stdout, _ = demo
    print(stdout[-1500:])
    assert results["num_heldout_questions"] == 30 * 4
    assert results["heldout_gold_recall"] >= 90
    assert results["closed_book_exact_match"] <= 15
    assert results["heldout_exact_match"] >= results["closed_book_exact_match"] + 40


@pytest.mark.slow
def test_fid_reads_more_passages_without_worse_answers(demo):
    results, _, _ = demo
    by_k = results["heldout_by_n_docs"]
    em = [by_k[k]["exact_match"] for k in ("2", "4")]
    assert em[1] >= em[0] - 1.0, by_k


@pytest.mark.slow
def test_fid_answers_follow_the_index_hot_swap(demo):
    results, _, _ = demo
    assert results["swapped_exact_match"] >= results["closed_book_exact_match"] + 40
