"""Gold recall around each index refresh: a run whose training gold recall@K falls sharply right after a refresh is
told so in its log (issue 32: a pretrained d(z) trained at the generator's 1e-3 beside a frozen q(x) went from 0.97
to 0.00 at the first refresh, and the run said nothing).

The step's metrics gold_hits / gold_known (questions whose gold passage was among the K retrieved / questions with
a known gold passage) are compared over `window` steps on each side of a refresh: before it, the steps since the
previous refresh (at most `window`); after it, the steps up to the next refresh (at most `window`). A fall of at
least SHARP_DROP is reported once both sides hold MIN_QUESTIONS questions with a known gold passage.
"""

from __future__ import annotations

import dataclasses
import math

# Of gold recall@K (a fraction). At 0.9 over MIN_QUESTIONS a side the difference of the two sides has a standard
# error of 0.053, so a fall of 0.1 is ~2 of them (more questions, more): issue 32's runs fell by 0.18 (dev recall@1
# 100 -> 73) and by 0.97 after a refresh, steady runs by at most 0.03.
SHARP_DROP = 0.1
MIN_QUESTIONS = 64  # questions with a known gold passage each side needs, or the refresh is not judged
WINDOW_QUESTIONS = 64  # a window spans at least this many questions (more steps for small batches)


@dataclasses.dataclass(frozen=True)
class Drop:
    """Gold recall@K before and after the refresh that followed step `step`, over the steps counted."""

    step: int
    before: float
    after: float
    steps_before: int
    steps_after: int

    def message(self) -> str:
        return (f"warning: training gold recall@K fell from {self.before:.2f} to {self.after:.2f} in the "
                f"{self.steps_after} steps after the index refresh at step {self.step} ({self.steps_before} steps "
                "before it): the refreshed index no longer matches the questions' vectors, as when d(z) trains "
                "faster than q(x) follows; lower model.doc_encoder.lr_scale or train q(x) "
                "(optim.question_encoder_lr_scale)")


def window_steps(log_every: int, batch_size: int) -> int:
    """Steps compared on each side of a refresh: a log interval, or more when that holds few questions."""
    return max(int(log_every), math.ceil(WINDOW_QUESTIONS / max(int(batch_size), 1)))


class RefreshRecallWatch:
    """Collects the steps' gold counts and the refresh steps; `judge` returns the refreshes after which recall fell."""

    def __init__(self, window: int):
        self.window = window
        self.counts: dict[int, tuple[float, float]] = {}  # step -> (gold_hits, gold_known)
        self.refreshes: list[int] = []  # every refresh so far (the previous one bounds a window)
        self.pending: list[int] = []  # refreshes not judged yet

    def refreshed(self, step: int) -> None:
        """A refresh followed step `step`: the steps after it search the new index."""
        self.refreshes.append(step)
        self.pending.append(step)

    def record(self, step: int, hits: float, known: float) -> None:
        self.counts[step] = (hits, known)

    def _recall(self, first: int, last: int) -> tuple[float | None, int]:
        """(gold recall over steps first..last that have counts, or None with too few questions; steps counted)."""
        steps = [self.counts[s] for s in range(first, last + 1) if s in self.counts]
        known = sum(k for _, k in steps)
        return (sum(h for h, _ in steps) / known if known >= MIN_QUESTIONS else None), len(steps)

    def judge(self, done: int, final: bool = False) -> list[Drop]:
        """Drops after the refreshes whose after-window has ended by step `done` (or all, at the run's `final`
        step); each refresh is judged once."""
        drops, waiting = [], []
        for step in self.pending:
            later = [r for r in self.refreshes if r > step]
            end = min([step + self.window] + later)
            if done < end and not final:
                waiting.append(step)
                continue
            earlier = [r for r in self.refreshes if r < step]
            before, n_before = self._recall(max([step - self.window] + earlier) + 1, step)
            after, n_after = self._recall(step + 1, min(end, done))
            if before is not None and after is not None and before - after >= SHARP_DROP:
                drops.append(Drop(step, before, after, n_before, n_after))
        self.pending = waiting
        oldest = min(self.pending + [done]) - self.window
        self.counts = {s: c for s, c in self.counts.items() if s > oldest}
        return drops
