"""A rerun of a finished job, in-process: it trains nothing, logs no metric twice and registers no second final
checkpoint, but evaluates the restored state, saves and uploads the adapter again and reports what it measured."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestrator.spec import spec_from_dict
from orchestrator.train import loop
from orchestrator.train.session import LocalContext


class _RecordingSink:
    """Stands in for MlflowSink: records every call."""

    calls: list[tuple] = []

    def __init__(self, tracking_uri, run_id):
        pass

    def __getattr__(self, name):
        def record(*args):
            _RecordingSink.calls.append((name, *args))
            return 0
        return record


class _RecordingContext(LocalContext):
    def __init__(self, root: str):
        self.reports, self.events = [], []
        super().__init__(root, on_progress=self.events.append)

    def report(self, metrics, checkpoint_dir, name):
        self.reports.append((dict(metrics), checkpoint_dir is not None, name))
        super().report(metrics, checkpoint_dir, name)


def _run(spec, root: Path, monkeypatch) -> tuple[dict, _RecordingContext, list[tuple]]:
    monkeypatch.setattr(loop, "MlflowSink", _RecordingSink)
    _RecordingSink.calls = []
    ctx = _RecordingContext(str(root))
    final = loop.train_worker(spec, ctx, "unused://", "run-id")
    return final, ctx, _RecordingSink.calls


def test_a_rerun_of_a_finished_job_publishes_again_and_records_nothing_twice(job, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    spec = spec_from_dict(job(scaling={"num_workers": 1}, train={"epochs": None, "max_steps": 4,
                                                                 "eval_every_steps": 2, "log_every_steps": 2}))
    checkpoints, adapter = tmp_path / "ckpt", Path(spec.output_dir, "adapter")
    first, ctx, calls = _run(spec, checkpoints, monkeypatch)
    assert [(name, has_checkpoint) for _, has_checkpoint, name in ctx.reports] == [
        ("step_0000002", True), ("step_0000004", True)]
    assert ctx.reports[-1][0] == first
    test_logged = [c for c in calls if c[0] == "log_metrics" and any(k.startswith("test_") for k in c[1])]
    assert [step for _, _, step in test_logged] == [4]
    trained = load_file(adapter / "adapter_model.safetensors")
    saved = sorted(p.name for p in checkpoints.iterdir())
    shutil.rmtree(adapter)

    again, ctx, calls = _run(spec, checkpoints, monkeypatch)
    measured = {k: v for k, v in first.items() if k.startswith(("eval_", "test_"))}
    assert set(again) == set(measured) and any(k.startswith("test_") for k in again)
    assert again == pytest.approx(measured, abs=1e-6)  # the restored state measures what training measured
    assert ctx.reports == [(again, False, "")]  # reported once, with no second final checkpoint
    assert sorted(p.name for p in checkpoints.iterdir()) == saved
    assert not [c for c in calls if c[0] in ("log_metrics", "log_table")]  # a rerun logs nothing twice
    assert [c for c in calls if c[0] == "log_artifacts"] == [("log_artifacts", str(adapter), loop.ADAPTER_ARTIFACT)]
    assert ("set_tags", {"orchestrator.resumed_from_step": "4"}) in calls
    assert [e["step"] for e in ctx.events if e["event"] == "start"] == [4]
    assert not [e for e in ctx.events if e["event"] in ("step", "eval")]
    assert ctx.events[-1] == {"event": "done", "adapter": str(adapter), **again}
    republished = load_file(adapter / "adapter_model.safetensors")
    assert republished.keys() == trained.keys() and all((republished[k] == trained[k]).all() for k in trained)
