"""`orchestrator compare` on the real local Ray cluster with a tiny model: one Ray Tune grid trial per method
through the same Ray Train + DeepSpeed loop, the table and chart, an MLflow parent run with a child per method,
and what cannot run here skipped with its reason."""

from __future__ import annotations

import csv
import json

import pytest

from orchestrator.cli import EXIT_BAD_INPUT, main
from orchestrator.spec import SpecError, spec_from_dict
from orchestrator.workflows.comparison import parse_methods
from tests.tiny import tiny_job, write_job


def test_methods_parse_with_options_and_typical_learning_rates(job):
    spec = spec_from_dict(job())
    variants = parse_methods("full,lora:r=16:lr=1e-3,prompt:tokens=5,ia3", spec)
    assert [v.label for v in variants] == ["full", "lora:r=16:lr=1e-3", "prompt:tokens=5", "ia3"]
    assert variants[0].fields == {"method.name": "full", "train.learning_rate": 5e-5}
    assert variants[1].fields == {"method.name": "lora", "lora.r": 16, "train.learning_rate": 1e-3}
    assert variants[2].fields["method.num_virtual_tokens"] == 5
    for bad, message in (("lora,lora", "distinct"), ("adapterx", "not one of"), ("lora:rank=4", "option 'rank'"),
                         ("lora:r=big", "not a number")):
        with pytest.raises(SpecError, match=message):
            parse_methods(bad, spec)


@pytest.mark.integration
def test_compare_trains_each_method_and_reports_them_side_by_side(ray_cluster, mlflow_server, tiny_model, tiny_data,
                                                                 tmp_path, capsys):
    from mlflow import MlflowClient

    raw = tiny_job(tmp_path, tiny_model, tiny_data, scaling={"num_workers": 1, "cpus_per_worker": 0.5},  # all 3 at once
                   train={"epochs": 1, "micro_batch_size": 16, "learning_rate": 0.01},
                   tracking={"uri": mlflow_server, "experiment": "comparisons"})
    job = write_job(tmp_path / "job.yaml", raw)
    assert main(["compare", str(job), "--methods", "full:lr=1e-3,lora:r=4,ia3,qlora,prefix"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "out" / "compare" / "compare"
    rows = {r["method"]: r for r in csv.DictReader(open(folder / "comparison.csv"))}
    assert set(rows) == {"full:lr=1e-3", "lora:r=4", "ia3"}
    assert all(r["status"] == "finished" for r in rows.values())
    assert float(rows["full:lr=1e-3"]["trained %"]) == 100.0
    assert 0 < float(rows["ia3"]["trained %"]) < float(rows["lora:r=4"]["trained %"]) < 100  # IA3: vectors only
    assert float(rows["full:lr=1e-3"]["test accuracy vs full"]) == 1.0
    for row in rows.values():
        assert float(row["test accuracy"]) > 0.25 and float(row["peak memory MiB"]) > 0 and float(row["wall s"]) > 0
    text = (folder / "comparison.md").read_text()
    assert "**qlora** skipped: method.name: qlora needs CUDA GPUs" in text  # never silently
    assert "**prefix** skipped: method.name: prefix tuning needs a model that takes past_key_values" in text
    assert float(rows["lora:r=4"]["learning rate"]) == 0.01  # the job's own
    assert (folder / "comparison.png").stat().st_size > 5000
    assert "| lora:r=4 |" in out

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("comparisons")
    parents = client.search_runs([experiment.experiment_id], "tags.mlflow.runName = 'tiny-compare'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    methods = sorted(json.loads(c.data.params["trial.variant"])["label"] for c in children)
    assert methods == ["full:lr=1e-3", "ia3", "lora:r=4"]
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "study")}
    assert {"study/comparison.md", "study/comparison.png", "study/comparison.csv"} <= artifacts


def test_nothing_runnable_is_refused_before_any_work(job, tmp_path, capsys):
    path = write_job(tmp_path / "job.yaml", job(scaling={"num_workers": 1}))
    assert main(["compare", str(path), "--methods", "qlora,prefix"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "none of them can run here" in err and "qlora" in err and "prefix" in err
    assert not (tmp_path / "out").exists()
