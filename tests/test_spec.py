"""The job spec: strict parsing, messages that name the field, cross-field rules, overrides, shipped jobs."""

from __future__ import annotations

import json

import pytest

from orchestrator.spec import JobSpec, SpecError, json_schema, load_spec, spec_from_dict
from tests.conftest import REPO
from tests.tiny import write_job


def error_of(raw: dict) -> str:
    with pytest.raises(SpecError) as caught:
        spec_from_dict(raw)
    return str(caught.value)


def test_defaults_live_in_the_spec(job):
    spec = spec_from_dict(job())
    assert spec.deepspeed.zero_stage == 2 and spec.train.precision == "auto" and spec.lora.dropout == 0.05
    assert spec.run_name() == "tiny"


@pytest.mark.parametrize("section, key, meant", [
    ("lora", "alpah", "alpha"), ("train", "learning_rte", "learning_rate"), ("deepspeed", "zero_stag", "zero_stage"),
    ("scaling", "num_worker", "num_workers"), ("data", "text_col", "text_column"), ("model", "pth", "path"),
    ("tracking", "experment", "experiment"),
])
def test_unknown_keys_name_the_path_and_a_close_match(job, section, key, meant):
    raw = job()
    raw[section] = {**raw.get(section, {}), key: 1}
    assert f"{section}.{key}: unknown key; did you mean '{meant}'?" in error_of(raw)


def test_unknown_top_level_key_lists_known_keys(job):
    message = error_of({**job(), "zzz": 1})
    assert "zzz: unknown key" in message and "lora" in message


@pytest.mark.parametrize("section, value, field", [
    ("lora", {"r": 0}, "lora.r"), ("lora", {"r": -3}, "lora.r"), ("lora", {"dropout": 1.5}, "lora.dropout"),
    ("train", {"learning_rate": 0}, "train.learning_rate"), ("deepspeed", {"zero_stage": 4}, "deepspeed.zero_stage"),
    ("scaling", {"num_workers": 0}, "scaling.num_workers"), ("train", {"precision": "fp8"}, "train.precision"),
    ("data", {"max_length": 2}, "data.max_length"), ("train", {"micro_batch_size": "big"}, "train.micro_batch_size"),
])
def test_types_and_ranges_are_checked(job, section, value, field):
    assert error_of(job(**{section: value})).count(field) >= 1


@pytest.mark.parametrize("sections, field", [
    ({"train": {"epochs": 1, "max_steps": 5}}, "train.epochs"),
    ({"data": {"validation_split": 0.1}}, "data.validation_split"),
    ({"deepspeed": {"offload_params": True, "zero_stage": 2}}, "deepspeed.offload_params"),
    ({"train": {"precision": "fp16"}}, "train.precision"),
    ({"data": {"format": "chat"}}, "data.format"),
    ({"data": {"packing": True}}, "data.packing"),
    ({"model": {"task": "causal_lm"}, "tune": {"space": {"lora.r": {"choice": [2, 4]}}, "metric": "eval_accuracy"}},
     "tune.metric"),
])
def test_cross_field_rules_name_the_field(job, sections, field):
    assert f"{field}: " in error_of(job(**sections))


def test_a_causal_lm_search_defaults_to_validation_loss(job):
    spec = spec_from_dict(job(model={"task": "causal_lm"}, tune={"space": {"lora.r": {"choice": [2, 4]}}}))
    assert (spec.tune.metric, spec.tune.direction()) == ("eval_loss", "min")


def test_no_validation_data_is_refused(job):
    raw = job()
    del raw["data"]["validation"]
    assert "data.validation: evaluation needs data" in error_of(raw)


def test_version_is_required(job):
    raw = job()
    del raw["version"]
    assert "version: must be 1" in error_of(raw)


def test_overrides_apply_by_key_path(tmp_path, job):
    path = write_job(tmp_path / "job.yaml", job())
    spec = load_spec(path, ["lora.r=16", "train.learning_rate=1e-3", "lora.target_modules=[query]"])
    assert spec.lora.r == 16 and spec.train.learning_rate == 1e-3 and spec.lora.target_modules == ["query"]
    with pytest.raises(SpecError, match="lora.rank: unknown key; known keys: r, alpha"):
        load_spec(path, ["lora.rank=4"])
    with pytest.raises(SpecError, match="key.path=value"):
        load_spec(path, ["lora.r"])


def test_relative_paths_resolve_against_the_working_directory(tmp_path, job, monkeypatch):
    raw = job(output_dir="out", data={"train": "d/train.jsonl", "validation": "d/validation.jsonl"})
    monkeypatch.chdir(tmp_path)
    spec = spec_from_dict(raw)
    assert spec.output_dir == str(tmp_path / "out") and spec.data.train == str(tmp_path / "d" / "train.jsonl")


@pytest.mark.parametrize("text, message", [
    ("version: 1\nmodel: [unclosed", "not valid YAML"), ("- a\n- b\n", "a mapping of sections"),
])
def test_unreadable_job_files(tmp_path, text, message):
    (tmp_path / "job.yaml").write_text(text)
    with pytest.raises(SpecError, match=message):
        load_spec(tmp_path / "job.yaml")


def test_schema_is_json_schema_of_the_spec():
    schema = json_schema()
    assert schema["additionalProperties"] is False and {"model", "data", "lora"} <= set(schema["properties"])
    json.dumps(schema)


@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_loads_and_says_how_to_run_it(path, monkeypatch):
    monkeypatch.chdir(REPO)
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# orchestrator ") and path.name in first_line
    assert isinstance(load_spec(path), JobSpec)
