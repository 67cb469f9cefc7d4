"""The post-refresh recall watch (rag_jax/training/refresh_watch.py): a sharp fall of training gold recall@K right
after an index refresh is reported once, with the figures; a steady run, a fall before the refresh, or too few
questions with a known gold passage are not."""

from rag_jax.training import refresh_watch

BATCH = 16  # questions with a known gold passage per step


def _watch(recall_before: float, recall_after: float, refresh_at: int = 10, steps: int = 20, window: int = 5):
    """A watch fed `steps` steps of BATCH questions, recall_before up to the refresh after step `refresh_at`,
    recall_after from then on; returns (the watch, the drops it reported at each step)."""
    watch = refresh_watch.RefreshRecallWatch(window)
    reported = {}
    for step in range(1, steps + 1):
        recall = recall_before if step <= refresh_at else recall_after
        watch.record(step, recall * BATCH, BATCH)
        if step == refresh_at:
            watch.refreshed(step)
        drops = watch.judge(step, final=step == steps)
        if drops:
            reported[step] = drops
    return watch, reported


def test_a_sharp_fall_after_a_refresh_is_reported_once_with_its_figures():
    _, reported = _watch(0.875, 0.125)
    assert list(reported) == [15]  # judged when the window after the refresh (5 steps) has passed, and only then
    (drop,) = reported[15]
    assert (drop.step, drop.before, drop.after, drop.steps_before, drop.steps_after) == (10, 0.875, 0.125, 5, 5)
    message = drop.message()
    assert "fell from 0.88 to 0.12" in message and "refresh at step 10" in message and "\n" not in message
    assert "model.doc_encoder.lr_scale" in message and "optim.question_encoder_lr_scale" in message


def test_steady_or_small_changes_are_not_reported():
    for before, after in ((0.875, 0.875), (0.875, 0.8125), (0.5, 1.0)):
        assert _watch(before, after)[1] == {}, (before, after)


def test_the_last_refresh_is_judged_at_the_final_step_over_the_steps_it_had():
    _, reported = _watch(1.0, 0.0, refresh_at=16, steps=20)  # 4 steps after it (64 questions), not the window's 5
    ((drop,),) = reported.values()
    assert list(reported) == [20] and drop.steps_after == 4


def test_too_few_known_gold_passages_are_not_judged():
    watch = refresh_watch.RefreshRecallWatch(window=2)
    for step in (1, 2, 3, 4):
        watch.record(step, 16.0 if step <= 2 else 0.0, 16.0)  # 1.0 -> 0.0, but 32 known questions a side
        if step == 2:
            watch.refreshed(step)
    assert refresh_watch.MIN_QUESTIONS > 32 and watch.judge(4, final=True) == []


def test_the_window_before_a_refresh_stops_at_the_previous_refresh():
    watch = refresh_watch.RefreshRecallWatch(window=10)
    recalls = {**{s: 1.0 for s in range(1, 6)}, **{s: 0.5 for s in range(6, 11)}, **{s: 0.25 for s in range(11, 16)}}
    for step, recall in recalls.items():
        watch.record(step, recall * BATCH, BATCH)
        if step in (5, 10):
            watch.refreshed(step)
    drops = watch.judge(15, final=True)
    # After step 5: 1.0 -> 0.5 (steps 6-10, up to the next refresh), a drop; after 10: 0.5 (not 0.75) -> 0.25, one.
    assert [(d.step, d.before, d.after, d.steps_before) for d in drops] == [(5, 1.0, 0.5, 5), (10, 0.5, 0.25, 5)]


def test_the_window_spans_enough_questions_for_small_batches():
    assert refresh_watch.window_steps(log_every=25, batch_size=32) == 25
    assert refresh_watch.window_steps(log_every=2, batch_size=8) == refresh_watch.WINDOW_QUESTIONS // 8
    assert refresh_watch.WINDOW_QUESTIONS >= refresh_watch.MIN_QUESTIONS  # a whole window is judged
