"""The log line's figures from a window summed over workers: the mean loss, rates of all workers together."""

from __future__ import annotations

import pytest

from orchestrator.plan.logging_window import LogWindow, window_metrics


def _window(micro_losses: list[float], tokens: int, examples: int, seconds: float) -> LogWindow:
    """One worker's window of two optimizer steps of two micro-batches each."""
    window = LogWindow()
    for step in range(2):
        for loss in micro_losses[2 * step:2 * step + 2]:
            window = window.add(loss=loss / 2, tokens=tokens, examples=examples)
        window = window.add(steps=1, seconds=seconds)
    return window


def test_two_workers_give_the_mean_loss_and_the_rates_of_both_together():
    first = _window([1.0, 3.0, 2.0, 2.0], tokens=100, examples=4, seconds=0.5)  # mean loss 2, 1 s in all
    second = _window([4.0, 4.0, 3.0, 5.0], tokens=50, examples=4, seconds=1.5)  # mean loss 4, 3 s in all
    assert (first.loss, first.tokens, first.examples, first.seconds, first.steps) == (4.0, 400, 16, 1.0, 2)
    summed = first.summed([a + b for a, b in zip(first.sums(), second.sums())])  # what all_reduce gives
    assert summed.steps == 2  # the same steps on every worker: never summed

    metrics = window_metrics(summed, world_size=2, train_seconds=10.0)
    assert metrics == pytest.approx({"train_loss": 3.0,  # the mean over workers and steps
                                     "tokens_per_s": 600 / 2.0,  # both workers' tokens in the window's 2 s
                                     "samples_per_s": 32 / 2.0,
                                     "train_seconds": 12.0})


def test_one_worker_is_its_own_mean():
    window = _window([2.0, 2.0, 2.0, 2.0], tokens=10, examples=1, seconds=0.25)
    assert window_metrics(window.summed(window.sums()), 1, 0.0) == pytest.approx(
        {"train_loss": 2.0, "tokens_per_s": 40 / 0.5, "samples_per_s": 4 / 0.5, "train_seconds": 0.5})
