"""Tasks (rag_jax/tasks/): each metric against hand-worked examples, KILT's R-Precision and gating, the registry seam
(a task registered from this file alone is found by name) and the config check of task.name."""

import pytest

from rag_jax.tasks import base, kilt, registry, text_metrics


def _qa(answers, **extra):
    return {"question": "q", "answers": answers, **extra}


# ----------------------------------------------------------------------------------------------------------------
# qa


def test_qa_is_exact_match_and_f1_as_before():
    task = registry.get("qa")
    # "the cat sat" vs "cat sat down": normalised tokens [cat, sat] vs [cat, sat, down]: P 1, R 2/3, F1 0.8
    summary = base.evaluate(task, ["The Cat sat", "dog"], [_qa(["cat sat down"]), _qa(["Dog", "puppy"])])
    assert summary == pytest.approx({"exact_match": 50.0, "f1": 100 * (0.8 + 1.0) / 2, "num_questions": 2.0})


def test_curatedtrec_answers_are_regular_expressions_matched_from_the_start():
    task = registry.get("qa")
    regex = _qa([r"\d+ (miles|mi)", "Lincoln"], answers_are_regex=True)
    assert task.score("238 miles away", regex)["exact_match"] == 1.0  # re.match: from the start, any end
    assert task.score("LINCOLN", regex)["exact_match"] == 1.0  # case-insensitive
    assert task.score("about 238 miles", regex)["exact_match"] == 0.0  # not at the start
    # F1 is averaged over the plain examples only
    summary = base.evaluate(task, ["238 mi", "x"], [regex, _qa(["y"])])
    assert summary["exact_match"] == 50.0 and summary["f1"] == 0.0


def test_answer_recall_finds_plain_answers_as_dpr_and_patterns_anywhere_in_a_passage():
    task = registry.get("qa")
    passages = ["The Moon is far away.", "It is 238,855 miles from Earth."]
    assert task.answer_hit_rank(_qa(["238,855 miles"]), passages) == 1
    assert task.answer_hit_rank(_qa([r"2\d\d,?\d+ mi(les)?"], answers_are_regex=True), passages) == 1  # re.search
    assert task.answer_hit_rank(_qa(["Mars"]), passages) is None
    assert registry.get("fact_verification").answer_hit_rank is None  # a label is not in a passage


def test_a_regex_that_does_not_compile_is_one_error_naming_the_line():
    with pytest.raises(base.TaskDataError, match=r"f.csv:3: answer pattern '\(unclosed' is not a regular"):
        base.to_example(registry.get("qa"), {"input": "q", "outputs": ["(unclosed"], "answers_are_regex": True},
                        "f.csv:3")


def test_an_empty_answer_list_is_one_error_naming_the_line():
    with pytest.raises(base.TaskDataError, match="f.jsonl:2: no answers"):
        base.to_example(registry.get("qa"), {"input": "q", "outputs": []}, "f.jsonl:2")


# ----------------------------------------------------------------------------------------------------------------
# BLEU-1, ROUGE-L, Q-BLEU-1


def test_bleu1_by_hand():
    # "the cat sat on mat" vs "the cat is on the mat": 4 of 5 unigrams match (clipped: one "the"),
    # BP = exp(1 - 6/5); BLEU-1 = 80 * exp(-0.2) = 65.50
    stats = text_metrics.bleu1_statistics("the cat sat on mat", ["the cat is on the mat"])
    assert stats == {"bleu1_matches": 4.0, "bleu1_total": 5.0, "bleu1_sys_len": 5.0, "bleu1_ref_len": 6.0}
    assert text_metrics.bleu1_of_sums(stats) == pytest.approx(80 * 2.718281828 ** -0.2, abs=1e-3)


def test_corpus_bleu1_sums_the_examples_as_sacrebleu_does():
    import sacrebleu

    hyps, refs = ["the cat sat on mat", "a dog barked loudly today"], ["the cat is on the mat", "the dog barked"]
    sums = {}
    for h, r in zip(hyps, refs):
        for k, v in text_metrics.bleu1_statistics(h, [r]).items():
            sums[k] = sums.get(k, 0) + v
    # by hand: matches 4 + 2, total 5 + 5, lengths 10 vs 9: no brevity penalty, 60.0
    assert text_metrics.bleu1_of_sums(sums) == pytest.approx(60.0)
    expected = sacrebleu.metrics.BLEU(max_ngram_order=1).corpus_score(hyps, [refs]).score
    assert text_metrics.bleu1_of_sums(sums) == pytest.approx(expected)


def test_rouge_l_by_hand():
    # LCS of "the cat sat on mat" and "the cat is on the mat" is "the cat on mat" (4): P 4/5, R 4/6, F 8/11
    assert text_metrics.rouge_l("the cat sat on mat", ["the cat is on the mat"]) == pytest.approx(8 / 11)
    assert text_metrics.rouge_l("the cat sat on mat", ["dog", "the cat sat on mat"]) == pytest.approx(1.0)


def test_abstractive_qa_reports_rouge_l_and_bleu1():
    summary = base.evaluate(registry.get("abstractive_qa"), ["the cat sat on mat"], [_qa(["the cat is on the mat"])])
    assert summary["rouge_l"] == pytest.approx(100 * 8 / 11)
    assert summary["bleu1"] == pytest.approx(65.50, abs=0.01)


def test_qbleu_categories():
    words = text_metrics.word_categories("Which Austrian composer wrote the Magic Flute in 1791")
    assert words == {"question_word": {"which"}, "named_entity": {"austrian", "magic", "flute", "1791"},
                     "function": {"the", "in"}, "content": {"composer", "wrote"}}


def test_answerability_by_hand():
    # hyp "Who wrote Hamlet": question {who}, entity {hamlet}, content {wrote}, function {} (counts fully)
    # ref "Who wrote the play Hamlet": question {who}, entity {hamlet}, content {wrote, play}, function {the}
    # P = .6*1 + .2*1 + .1*1 + .1*1 = 1;  R = .6*1 + .2*1 + .1*(1/2) + .1*(0/1) = 0.85;  F = 2*.85/1.85
    assert text_metrics.answerability("Who wrote Hamlet", "Who wrote the play Hamlet") == pytest.approx(1.7 / 1.85)
    # losing the entity costs most: hyp "Who wrote the play": entity category empty in hyp (counts 1 for P), but R
    # misses hamlet (0.6 of the weight)
    assert text_metrics.answerability("Who wrote the play", "Who wrote the play Hamlet") < 0.6


def test_qbleu1_mixes_answerability_and_bleu1_with_delta():
    hyp, ref = "Who wrote Hamlet", "Who wrote the play Hamlet"
    expected = 0.7 * (1.7 / 1.85) + 0.3 * text_metrics.sentence_bleu1(hyp, [ref])
    assert text_metrics.qbleu1(hyp, [ref]) == pytest.approx(expected)
    # 3 of 3 unigrams match, BP exp(1 - 5/3): BLEU-1 = exp(-2/3)
    assert text_metrics.sentence_bleu1(hyp, [ref]) == pytest.approx(2.718281828 ** (-2 / 3), abs=1e-4)
    summary = base.evaluate(registry.get("question_generation"), [hyp], [_qa([ref])])
    assert summary["qbleu1"] == pytest.approx(100 * expected)


# ----------------------------------------------------------------------------------------------------------------
# fact verification


def test_fact_verification_labels_are_single_words_and_two_way_drops_not_enough_info():
    task = registry.get("fact_verification")
    examples = [base.to_example(task, {"input": f"claim {i}", "outputs": [label]}, f"f:{i}")
                for i, label in enumerate(["SUPPORTS", "REFUTES", "NOT ENOUGH INFO", "SUPPORTS"])]
    assert [e["answers"] for e in examples] == [["supports"], ["refutes"], ["unknown"], ["supports"]]
    summary = base.evaluate(task, ["supports", "Supports ", "unknown", "maybe"], examples)
    # three-way: right on 1 and 3 of 4; two-way: over the 3 SUPPORTS/REFUTES claims, right on 1
    assert summary["accuracy"] == 50.0 and summary["accuracy_2way"] == pytest.approx(100 / 3)


def test_a_label_outside_the_label_set_is_one_error_naming_the_line():
    with pytest.raises(base.TaskDataError, match="fever.jsonl:4: label 'MAYBE' is not one of SUPPORTS"):
        base.to_example(registry.get("fact_verification"), {"input": "c", "outputs": ["MAYBE"]}, "fever.jsonl:4")


# ----------------------------------------------------------------------------------------------------------------
# KILT


def test_r_precision_with_several_gold_pages_and_sets():
    # one set of two pages: R = 2, the first two distinct retrieved pages are A, C (B's second passage is a repeat)
    assert kilt.r_precision(["A", "A", "C", "B"], [["A", "B"]]) == 0.5
    assert kilt.r_precision(["B", "A", "C"], [["A", "B"]]) == 1.0
    # several provenance sets: the best one counts
    assert kilt.r_precision(["C", "D"], [["A", "B"], ["C"]]) == 1.0
    assert kilt.r_precision(["C"], []) == 0.0


def test_kilt_em_counts_only_where_r_precision_is_one():
    task = registry.get("qa")
    examples = [_qa(["paris"], pages=[["France"]]), _qa(["rome"], pages=[["Italy", "Rome"]])]
    # both answers right; the first found its page, the second found one of two (R-Precision 0.5)
    summary = base.evaluate(task, ["Paris", "Rome"], examples, retrieved_pages=[["France", "x"], ["Rome", "x"]])
    assert summary["exact_match"] == 100.0
    assert summary["r_precision"] == 75.0 and summary["kilt_em"] == 50.0 and summary["kilt_f1"] == 50.0


def test_kilt_scores_average_over_the_examples_with_pages():
    task = registry.get("fact_verification")
    examples = [{"question": "c1", "answers": ["supports"], "pages": [["A"]]},
                {"question": "c2", "answers": ["unknown"]}]  # NOT ENOUGH INFO: no page to find
    summary = base.evaluate(task, ["supports", "unknown"], examples, retrieved_pages=[["A"], ["B"]])
    assert summary["accuracy"] == 100.0 and summary["r_precision"] == 100.0 and summary["kilt_ac"] == 100.0


def test_statistic_names_cover_what_example_statistics_returns():
    for name in registry.BUILTIN:
        task = registry.get(name)
        stats = base.example_statistics(task, "supports", {"question": "q", "answers": ["supports"],
                                                           "pages": [["A"]]}, ["A"])
        assert list(stats) == base.statistic_names(task, with_pages=True)


# ----------------------------------------------------------------------------------------------------------------
# The seam: a task is one module + one registry line; one registered elsewhere is named "package.module:name".


def _toy_score(prediction, example):
    return {"longer": float(len(prediction) > len(example["answers"][0]))}


TOY = base.Task(name="toy_longer", statistics=("longer",), score=_toy_score, aggregate=base.mean_percent("longer"))
registry.register(TOY)


def test_a_task_registered_elsewhere_is_found_by_module_name_and_evaluates():
    assert registry.known("tests.test_tasks:toy_longer")
    assert registry.get("tests.test_tasks:toy_longer") is TOY
    assert base.evaluate(TOY, ["abcd", "a"], [_qa(["ab"]), _qa(["ab"])]) == {"longer": 50.0, "num_questions": 2.0}


def test_the_config_check_accepts_a_registered_task_and_names_the_known_ones():
    from experiments.configs import nq
    from rag_jax.runs import config_check

    config = nq.get_config("tiny")
    config.task.name = "tests.test_tasks:toy_longer"
    config_check.check_fields(config)
    config.task.name = "summarisation"
    with pytest.raises(config_check.ConfigError, match=r"task.name='summarisation'.*abstractive_qa"):
        config_check.check_fields(config)


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match="no task named 'nope'; known: abstractive_qa, fact_verification"):
        registry.get("nope")
