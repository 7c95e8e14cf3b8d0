"""Causal LM jobs on the real local Ray cluster: 2 Ray Train workers under DeepSpeed ZeRO-2 with packed chats,
MLflow holding the loss curve from the base model on and the generated samples table; and a search on
validation loss."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator.cli import main
from orchestrator.spec import spec_from_dict
from orchestrator.workflows.console import TrainingConsole
from orchestrator.workflows.training import train
from tests.tiny import write_job

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def finished(ray_cluster, tiny_llama, tiny_chats, tmp_path_factory):
    from tests.tiny import tiny_lm_job

    root = tmp_path_factory.mktemp("lm-zero2")
    spec = spec_from_dict(tiny_lm_job(root, tiny_llama, tiny_chats, deepspeed={"zero_stage": 2},
                                      data={"packing": True}, generation={"num_prompts": 2, "max_new_tokens": 4},
                                      train={"epochs": 3, "micro_batch_size": 8, "learning_rate": 0.02,
                                             "eval_every_steps": 6, "log_every_steps": 2}))
    output = io.StringIO()
    result = train(spec, console=TrainingConsole(Console(file=output, width=200)))
    return spec, result, output.getvalue()


def test_two_zero2_workers_lower_validation_loss_from_the_base_model(finished):
    from mlflow import MlflowClient

    spec, result, console = finished
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    history = sorted((m.step, m.value) for m in client.get_metric_history(result.run_id, "eval_loss"))
    steps = [step for step, _ in history]
    assert steps[0] == 0 and steps == sorted(set(steps))  # the base model first, each evaluation once
    assert history[-1][1] < 0.8 * history[0][1]
    perplexity = dict((m.step, m.value) for m in client.get_metric_history(result.run_id, "eval_perplexity"))
    assert perplexity[steps[-1]] == pytest.approx(2.718281828 ** history[-1][1], rel=1e-4)
    assert "perplexity" in console and "sample (base model)" in console


def test_generated_samples_are_an_mlflow_table_with_a_row_per_prompt_and_evaluation(finished):
    from mlflow import MlflowClient

    spec, result, _ = finished
    client = MlflowClient(result.tracking_uri)
    assert {"adapter", "samples.json"} <= {a.path for a in client.list_artifacts(result.run_id)}
    table = json.loads(Path(client.download_artifacts(result.run_id, "samples.json", spec.output_dir)).read_text())
    assert table["columns"] == ["step", "prompt", "completion"]
    evaluations = sorted(m.step for m in client.get_metric_history(result.run_id, "eval_loss"))
    assert sorted(row[0] for row in table["data"]) == sorted(evaluations * 2)  # 2 prompts at every evaluation
    questions = [json.loads(line)["messages"][0]["content"] for line in
                 Path(spec.data.validation).read_text().splitlines()[:2]]
    assert {row[1] for row in table["data"]} == set(questions)  # shown as a person wrote them, not templated


def test_a_search_on_a_causal_lm_ranks_trials_by_validation_loss(ray_cluster, lm_job, tmp_path, capsys):
    raw = lm_job(scaling={"num_workers": 1}, train={"epochs": None, "max_steps": 2, "micro_batch_size": 16,
                                                    "eval_every_steps": 1, "learning_rate": 0.02},
                 generation={"num_prompts": 0},
                 tune={"space": {"lora.r": {"grid": [2, 4]}}, "scheduler": {"name": "fifo"}, "register_best": False})
    assert main(["tune", str(write_job(tmp_path / "search.yaml", raw))]) == 0
    out = capsys.readouterr().out
    best = next(line for line in out.splitlines() if line.startswith("best:"))
    assert "trials:  2 (2 finished)" in out and "eval_loss" in best
