"""NQ-open TFDS builder (array_record, no TensorFlow) and the deterministic host-sharded input pipeline."""

import json
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rag_jax.data import tokenizers as tk
from rag_jax.data import nq_open, pipeline

# ---- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toks():
    return tk.load_rag_tokenizers()


@pytest.fixture(scope="module")
def mini_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def mini_lines():
    with open(nq_open.MINI_QUESTIONS, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _fake_source(n, answers_per_example=1):
    """In-memory source: any sequence of example dicts works as a pipeline source."""
    return [
        {
            "question": f"question number {i}",
            "answers": [f"answer {i} {j}" for j in range(answers_per_example)],
            "gold_passage_id": 1000 + i,
        }
        for i in range(n)
    ]


def _make(source, toks, **kw):
    kw.setdefault("global_batch_size", 8)
    kw.setdefault("seed", 0)
    kw.setdefault("shard_index", 0)
    kw.setdefault("num_shards", 1)
    return pipeline.TrainPipeline(source, toks.question, toks.generator, **kw)


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


# ---- TFDS builder -----------------------------------------------------------------------------------------------


def test_mini_builder_prepares_array_record_without_tensorflow(mini_dir, mini_lines):
    train = nq_open.get_data_source("mini", "train", data_dir=mini_dir)
    dev = nq_open.get_data_source("rag_nq_open/mini", "dev", data_dir=mini_dir)
    assert (len(train), len(dev)) == (len(mini_lines) - nq_open.MINI_DEV_SIZE, nq_open.MINI_DEV_SIZE)
    # File order is kept: train is the head of the file, dev the last MINI_DEV_SIZE lines.
    assert train[0] == mini_lines[0]
    assert train[len(train) - 1] == mini_lines[len(train) - 1]
    assert dev[0] == mini_lines[len(train)]
    assert dev[-1] == mini_lines[-1]
    assert train.__getitems__([5, 2]) == [mini_lines[5], mini_lines[2]]
    assert isinstance(train[0]["question"], str) and isinstance(train[0]["answers"][0], str)
    assert "Röntgen" in train[0]["answers"][0]  # UTF-8 survives the round trip.
    files = [p.name for p in (nq_open.epath.Path(mini_dir) / "rag_nq_open" / "mini" / "1.0.0").iterdir()]
    assert any(".array_record-" in f and "train" in f for f in files), files
    assert "tensorflow" not in sys.modules
    with pytest.raises(IndexError):
        train[len(train)]


def test_official_builder_from_manual_dir(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    lines = [
        {"question": "who sings does he love me with reba", "answer": ["Linda Davis"]},
        {"question": "where is the world's largest ice sheet located today", "answer": ["Antarctica", "Antarctic"]},
        {"question": "what is the fourth book in the ñ series", "answer": ["Q"]},
    ]
    (manual / "NQ-open.train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    (manual / "NQ-open.dev.jsonl").write_text(json.dumps(lines[1]) + "\n", encoding="utf-8")
    train = nq_open.get_data_source("official", "train", data_dir=str(tmp_path / "data"), manual_dir=str(manual))
    dev = nq_open.get_data_source("official", "dev", data_dir=str(tmp_path / "data"), manual_dir=str(manual))
    expected = [{"question": x["question"], "answers": x["answer"], "gold_passage_id": -1} for x in lines]
    assert [train[i] for i in range(len(train))] == expected
    assert len(dev) == 1 and dev[0] == expected[1]


def test_official_builder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.*does not exist.*NQ-open.train.jsonl"):
        nq_open.get_data_source("official", "train", str(tmp_path / "data"), str(tmp_path / "nope"))
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "NQ-open.train.jsonl").write_text('{"question": "q", "answer": ["a"]}\n')
    with pytest.raises(FileNotFoundError, match=str(manual / "NQ-open.dev.jsonl")):
        nq_open.get_data_source("official", "train", str(tmp_path / "data"), str(manual))
    with pytest.raises(FileNotFoundError, match="manual"):  # Default manual dir <data_dir>/downloads/manual absent.
        nq_open.get_data_source("official", "train", str(tmp_path / "data2"))
    with pytest.raises(ValueError, match="choose one of"):
        nq_open.get_data_source("nq", "train", str(tmp_path / "data"))


def test_read_nq_jsonl_reports_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"question": "q", "answer": ["a"]}\n{"question": "q2", "answer": "a"}\n')
    with pytest.raises(ValueError, match=f"{path}:2: field 'answer'"):
        list(nq_open.read_nq_jsonl(str(path)))
    path.write_text('{"question": "q", "answer": ["a"]}\n{oops\n')
    with pytest.raises(ValueError, match=f"{path}:2: not valid JSON"):
        list(nq_open.read_nq_jsonl(str(path)))


# ---- pipeline ---------------------------------------------------------------------------------------------------


def test_question_and_label_tokenisation(toks):
    source = [
        {"question": "Hello world", "answers": ["Hello world"], "gold_passage_id": 7},
        {"question": "a " * 100, "answers": [" ".join(["word"] * 50)], "gold_passage_id": -1},
    ]
    kw = dict(global_batch_size=2, max_question_length=8, max_target_length=6)
    plain = _make(source, toks, answer_prefix_space=False, **kw).batch_at(0)
    order = list(plain["example_index"])
    hello, long = order.index(0), order.index(1)
    np.testing.assert_array_equal(plain["question_input_ids"][hello], [101, 7592, 2088, 102, 0, 0, 0, 0])
    np.testing.assert_array_equal(plain["question_attention_mask"][hello], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(plain["labels"][hello], [0, 31414, 232, 2, 1, 1])  # <s> Hello world </s> pad pad
    # Truncation keeps </s> last and fills the full length.
    assert plain["question_input_ids"][long][-1] == 102 and plain["question_attention_mask"][long].all()
    assert plain["labels"][long][0] == 0 and plain["labels"][long][-1] == 2 and 1 not in plain["labels"][long]
    assert plain["gold_passage_id"][hello] == 7 and plain["gold_passage_id"][long] == -1
    assert plain["question"][hello] == "Hello world" and plain["answers"][hello] == ["Hello world"]
    for k in ("question_input_ids", "question_attention_mask", "labels", "gold_passage_id", "example_index"):
        assert plain[k].dtype == np.int32, k
    # Default: a prefix space selects the word-initial "ĠHello" (20920), as the HF research project's targets did.
    spaced = _make(source, toks, **kw).batch_at(0)
    np.testing.assert_array_equal(spaced["labels"][hello], [0, 20920, 232, 2, 1, 1])


def test_same_seed_same_batches_and_epochs_are_permutations(toks):
    source = _fake_source(37)  # 4 steps per epoch of 8; 5 examples dropped per epoch.
    a, b = _make(source, toks), _make(source, toks)
    batches_a = [next(a) for _ in range(10)]
    for x in batches_a:
        _assert_batches_equal(x, next(b))
    epoch0 = np.concatenate([x["example_index"] for x in batches_a[:4]])
    epoch1 = np.concatenate([x["example_index"] for x in batches_a[4:8]])
    assert len(set(epoch0)) == 32 and len(set(epoch1)) == 32  # No repeats within an epoch.
    assert not np.array_equal(epoch0, epoch1)  # A new order every epoch.
    other_seed = _make(source, toks, seed=1).batch_at(0)
    assert not np.array_equal(other_seed["example_index"], batches_a[0]["example_index"])
    # Batch contents follow the indices.
    x = batches_a[0]
    assert x["question"] == [source[i]["question"] for i in x["example_index"]]
    np.testing.assert_array_equal(x["gold_passage_id"], 1000 + x["example_index"])


def test_resume_from_state_continues_identically(toks):
    source = _fake_source(30, answers_per_example=3)
    reference = _make(source, toks, answer_choice="random")
    expected = [next(reference) for _ in range(9)]

    first = _make(source, toks, answer_choice="random")
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.get_state()))  # Must survive serialisation.
    assert state["step"] == 5

    resumed = _make(source, toks, answer_choice="random")
    resumed.set_state(state)
    for want in expected[5:]:
        _assert_batches_equal(want, next(resumed))
    started = _make(source, toks, answer_choice="random", start_step=5)
    _assert_batches_equal(expected[5], next(started))
    with pytest.raises(ValueError, match="seed=0 but this pipeline has seed=3"):
        _make(source, toks, seed=3).set_state(state)


def test_num_epochs_stops(toks):
    p = _make(_fake_source(17), toks, num_epochs=2)  # 2 steps per epoch.
    assert len(list(p)) == 4


def test_two_hosts_union_is_the_single_host_batch(toks):
    source = _fake_source(50, answers_per_example=2)
    single = _make(source, toks, answer_choice="random")
    hosts = [_make(source, toks, answer_choice="random", shard_index=h, num_shards=2) for h in range(2)]
    assert hosts[0].local_batch_size == 4
    for _ in range(8):
        want = next(single)
        got = [next(h) for h in hosts]
        assert not set(got[0]["example_index"]) & set(got[1]["example_index"])
        for k, v in want.items():
            joined = np.concatenate([g[k] for g in got]) if isinstance(v, np.ndarray) else got[0][k] + got[1][k]
            if isinstance(v, np.ndarray):
                np.testing.assert_array_equal(joined, v, err_msg=k)
            else:
                assert joined == v, k


def test_answer_choice(toks):
    source = _fake_source(8, answers_per_example=4)
    first = _make(source, toks, global_batch_size=8, answer_prefix_space=False)
    labels = [first.batch_at(s)["labels"] for s in range(3)]
    decoded = {toks.generator.decode(row, skip_special_tokens=True) for lab in labels for row in lab}
    assert decoded == {f"answer {i} 0" for i in range(8)}

    rand = _make(source, toks, global_batch_size=8, answer_choice="random", answer_prefix_space=False)
    picks = []
    for step in range(6):
        b = rand.batch_at(step)
        for i, row in zip(b["example_index"], b["labels"]):
            picks.append((int(i), toks.generator.decode(row, skip_special_tokens=True)))
    assert all(text.startswith(f"answer {i} ") for i, text in picks)
    assert len({text for _, text in picks}) > 8  # Different answers get drawn across epochs.
    again = _make(source, toks, global_batch_size=8, answer_choice="random", answer_prefix_space=False)
    np.testing.assert_array_equal(again.batch_at(5)["labels"], rand.batch_at(5)["labels"])


def test_pipeline_errors(toks):
    with pytest.raises(ValueError, match="global_batch_size=10.*num_shards=4"):
        _make(_fake_source(40), toks, global_batch_size=10, num_shards=4)
    with pytest.raises(ValueError, match="5 examples, fewer than one global batch of 8"):
        _make(_fake_source(5), toks)
    with pytest.raises(ValueError, match="answer_choice"):
        _make(_fake_source(40), toks, answer_choice="longest")
    bad = _fake_source(8)
    bad[3]["answers"] = []
    with pytest.raises(ValueError, match="Example 3 .* no answers"):
        _make(bad, toks).batch_at(0)


def test_pipeline_on_mini_task(mini_dir, toks):
    train = nq_open.get_data_source("mini", "train", data_dir=mini_dir)
    b = _make(train, toks, global_batch_size=16, seed=3).batch_at(0)
    assert b["question_input_ids"].shape == (16, 64) and b["labels"].shape == (16, 25)
    i = int(b["example_index"][0])
    assert b["question"][0] == train[i]["question"]
    assert b["gold_passage_id"][0] == train[i]["gold_passage_id"] > 0
    assert toks.question.decode(b["question_input_ids"][0], skip_special_tokens=True) == train[i]["question"].lower()


# ---- global batch -----------------------------------------------------------------------------------------------


def test_make_global_batch_on_8_devices(toks):
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    local = _make(_fake_source(40), toks, global_batch_size=16).batch_at(0)

    mesh = jax.make_mesh((4, 2), ("data", "model"))
    g = pipeline.make_global_batch(local, mesh, P("data"))
    assert g["labels"].shape == (16, 25) and g["labels"].sharding.spec == P("data")
    np.testing.assert_array_equal(np.asarray(g["question_input_ids"]), local["question_input_ids"])
    for shard in g["labels"].addressable_shards:
        assert shard.data.shape == (4, 25)  # 4-way over data, replicated over model.
        np.testing.assert_array_equal(np.asarray(shard.data), local["labels"][shard.index])
    assert g["question"] == local["question"] and g["answers"] is local["answers"]  # Host-side, unchanged.

    g8 = pipeline.make_global_batch(local, mesh, {k: P(("data", "model")) for k in local})
    assert {s.data.shape[0] for s in g8["example_index"].addressable_shards} == {2}
    np.testing.assert_array_equal(np.asarray(g8["example_index"]), local["example_index"])


def test_make_global_batch_rejects_indivisible_batch(toks):
    local = _make(_fake_source(40), toks, global_batch_size=12).batch_at(0)
    mesh = jax.make_mesh((8,), ("data",))
    with pytest.raises(ValueError, match="global batch of 12 rows .* not divisible by the 8 batch shards"):
        pipeline.make_global_batch(local, mesh, P("data"))
