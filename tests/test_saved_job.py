"""The job saved with an adapter is read back typed and leniently, as PEFT reads old adapter configs: keys this
version does not know are dropped with one warning naming them, missing keys take the spec's defaults, and what
no longer validates is refused naming the adapter folder. (Serving on such a job: tests/test_adapters.py.)"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml

from orchestrator.serve.inference import load_adapter, saved_job
from orchestrator.spec import DataSpec, SpecError, spec_from_dict
from orchestrator.spec.loading import saved_spec


def _job(tmp_path: Path, **sections) -> dict:
    job = {"version": 1, "name": "saved", "output_dir": str(tmp_path / "out"), "model": {"path": "/models/base"},
           "data": {"train": "/data/train.jsonl", "validation": "/data/validation.jsonl", "max_length": 64},
           "train": {"max_steps": 4}}
    return {**job, **sections}


def _adapter(folder: Path, job: dict, task_type: str = "SEQ_CLS") -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"task_type": task_type, "peft_type": "LORA"}))
    (folder / "orchestrator_job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    return folder


def test_what_training_saved_reads_back_equal_and_quietly(tmp_path):
    spec = spec_from_dict(_job(tmp_path))
    folder = _adapter(tmp_path / "adapter", spec.model_dump())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unknown, nothing to say
        assert saved_job(str(folder)) == spec


def test_unknown_keys_at_any_depth_are_dropped_with_one_warning_naming_them(tmp_path):
    job = _job(tmp_path)
    job["data"]["max_len"] = job["data"].pop("max_length")  # a field renamed since the adapter was trained
    job["model"]["quantize"] = "int8"
    job["tune"] = {"space": {"train.learning_rate": {"choice": [1e-3], "prior": "flat"}}, "metric": "eval_loss"}
    job["serving"] = {"replicas": 2}
    with pytest.warns(UserWarning) as caught:
        spec = saved_spec(job, "/adapters/a/orchestrator_job.yaml")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith("/adapters/a/orchestrator_job.yaml: ")
    for dropped in ("data.max_len", "model.quantize", "tune.space.train.learning_rate.prior", "serving"):
        assert dropped in message
    assert "data.max_length" not in message
    assert spec.data.max_length == DataSpec.model_fields["max_length"].default == 128  # training's default
    assert spec.tune.space["train.learning_rate"].choice == [1e-3]  # the known keys beside a dropped one stay


def test_the_saved_job_is_taken_as_it_ran_not_checked_as_a_new_job(tmp_path):
    """The search space was checked when the study ran; saved paths are absolute and not resolved again."""
    job = _job(tmp_path, tune={"space": {"train.learning_rate": {"choice": [5.0]}}, "metric": "eval_loss"},
               output_dir="relative/out")
    with pytest.raises(SpecError, match="tune.space.train.learning_rate"):
        spec_from_dict(job)  # as a new job: 5.0 is not a learning rate
    spec = saved_spec(job, "saved")
    assert spec.tune.space["train.learning_rate"].choice == [5.0]
    assert spec.output_dir == "relative/out"


@pytest.mark.parametrize(("change", "message"), [
    ({"version": 2}, "version: saved with spec version 2"),
    ({"data": {"train": "/data/train.jsonl", "validation": "/data/v.jsonl", "max_length": 4}}, "data.max_length"),
    ({"train": {"max_steps": 4, "epochs": 1}}, "train.epochs: set exactly one"),
])
def test_a_saved_job_that_does_not_validate_is_refused_naming_the_adapter_folder(tmp_path, change, message):
    folder = _adapter(tmp_path / "my-adapter", {**_job(tmp_path), **change}, task_type="CAUSAL_LM")
    with pytest.raises(SpecError, match=message) as raised:
        load_adapter(str(folder))  # refused before any model is loaded
    assert str(folder / "orchestrator_job.yaml") in str(raised.value)

