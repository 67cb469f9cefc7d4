"""Provenance through the command lines: `eval_nq --provenance` JSON, the pictures drawn from it, and `ask` (its
arguments, its prompt, its picture). A random Hugging Face RAG-Token directory and an index of real passages (the
fixture of tests/test_cli_hostile.py); what the answers say does not matter here, what is written about them does.
"""

import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from rag_jax.inference import provenance_plot
from tests import process_env
from tests.hostile import ROOT, run

pytest_plugins = ["tests.hostile"]  # the session fixture hf_space, shared with the hostile tables


@pytest.fixture(scope="module")
def records(hf_space, tmp_path_factory):  # noqa: F811
    output = tmp_path_factory.mktemp("eval") / "predictions.jsonl"
    done = run("experiments.eval_nq", f"--model={hf_space}/rag", f"--index={hf_space}/index",
               f"--questions={hf_space}/questions.jsonl", f"--output={output}", "--provenance", "--max_length=6")
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in output.read_text().splitlines()]


def test_eval_writes_each_documents_prior_and_posterior_and_the_token_rows(records):
    assert len(records) == 3
    for record in records:
        prov = record["provenance"]
        docs = prov["documents"]
        assert [d["id"] for d in docs] == record["doc_ids"] and all(d["title"] for d in docs)
        scores = np.array(record["doc_scores"])
        prior = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        np.testing.assert_allclose([d["prior"] for d in docs], prior, rtol=1e-5)
        assert sum(d["posterior"] for d in docs) == pytest.approx(1.0, abs=1e-5)
        assert 1 <= len(prov["tokens"]) <= 5  # max_length 6 counts the start token, which has no row
        for row in prov["tokens"]:
            assert len(row["posteriors"]) == 3 and sum(row["posteriors"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("extension", [".png", ".svg", ".html"])
def test_the_picture_draws_the_posteriors_of_the_json(records, extension):
    """Per question, the heatmap's image is the token x document matrix of the JSON (documents down, tokens
    across), and the bars are its priors and posteriors."""
    out = io.BytesIO()
    figure = provenance_plot.write(records, out, extension)
    assert len(out.getvalue()) > 1000
    for i, record in enumerate(records):
        heat, bars = figure.axes[2 * i], figure.axes[2 * i + 1]
        drawn = np.asarray(heat.images[0].get_array())
        written = np.array([row["posteriors"] for row in record["provenance"]["tokens"]])
        assert drawn.shape == (3, len(record["provenance"]["tokens"]))  # one column per generated token
        np.testing.assert_array_equal(drawn, written.T)
        widths = [patch.get_width() for patch in bars.patches]
        docs = record["provenance"]["documents"]
        assert widths == [d["prior"] for d in docs] + [d["posterior"] for d in docs]


def test_ask_answers_its_arguments_and_writes_the_picture(hf_space, tmp_path):  # noqa: F811
    picture = tmp_path / "why.png"
    done = run("experiments.ask", f"--model={hf_space}/rag", f"--index={hf_space}/index", f"--plot={picture}",
               "--max_length=6", "who wrote the song", "when did it happen")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("answer:") == 2 and len(re.findall(r"posterior \d\.\d{3}  prior", done.stdout)) == 2 * 3
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run("experiments.ask", f"--model={hf_space}/rag", f"--index={hf_space}/index", f"--plot={picture}", "x")
    assert again.returncode == 1 and "--overwrite" in again.stderr  # an existing picture is kept


def test_a_bad_line_at_the_prompt_does_not_end_the_session(hf_space, tmp_path):  # noqa: F811
    """An empty line is refused and the next question is still answered; the exit status says one was refused."""
    done = subprocess.run([sys.executable, "-m", "experiments.ask", f"--model={hf_space}/rag",
                           f"--index={hf_space}/index", "--max_length=6"], input="\nwho wrote the song\n",
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=process_env.command_env())  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert done.stdout.count("question: who wrote the song") == 1 and "answer:" in done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0].startswith("error: an empty question") and errors[-1] == done.stderr.strip().splitlines()[-1]
    assert "1 of 2 questions were refused" in errors[-1]
