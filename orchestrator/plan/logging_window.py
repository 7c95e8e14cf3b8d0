"""The training loop's log line: what the steps since the last line add up to, and the rates they give.

Pure: the loop all-reduces :meth:`LogWindow.sums` over the workers itself (the collective is the loop's) and
hands the result to :func:`window_metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["LogWindow", "window_metrics"]


class LogWindow(NamedTuple):
    """Sums over the optimizer steps since the last log line, on one worker (or, all-reduced, over all)."""

    loss: float = 0.0  # each step's mean micro-batch loss, summed over the steps
    tokens: int = 0  # tokens the micro-batches carried (as the task counts them)
    examples: int = 0
    seconds: float = 0.0  # forward/backward/step time only: no evaluation, report or logging
    steps: int = 0  # optimizer steps; every worker runs the same ones, so this one is never summed

    def add(self, loss: float = 0.0, tokens: int = 0, examples: int = 0, seconds: float = 0.0,
            steps: int = 0) -> LogWindow:
        return LogWindow(self.loss + loss, self.tokens + tokens, self.examples + examples, self.seconds + seconds,
                         self.steps + steps)

    def sums(self) -> list[float]:
        """What is summed over the workers: loss, tokens, examples, seconds."""
        return [self.loss, self.tokens, self.examples, self.seconds]

    def summed(self, sums: Sequence[float]) -> LogWindow:
        """This window with :meth:`sums` replaced by their all-reduced values (``steps`` stays this worker's)."""
        loss, tokens, examples, seconds = sums
        return LogWindow(loss, tokens, examples, seconds, self.steps)


def window_metrics(summed: LogWindow, world_size: int, train_seconds: float) -> dict[str, float]:
    """The log line's training figures from a window summed over ``world_size`` workers.

    Args:
        summed: the window with loss, tokens, examples and seconds summed over the workers.
        world_size: how many workers were summed.
        train_seconds: the training time logged before this window (s).

    Returns:
        ``train_loss`` (mean over workers and steps), ``tokens_per_s`` and ``samples_per_s`` (all workers
        together, per second of the window), ``train_seconds`` (including this window).
    """
    seconds = summed.seconds / world_size  # every worker timed the same steps: the window lasted their mean
    return {"train_loss": summed.loss / world_size / summed.steps,
            "tokens_per_s": summed.tokens / seconds, "samples_per_s": summed.examples / seconds,
            "train_seconds": train_seconds + seconds}
