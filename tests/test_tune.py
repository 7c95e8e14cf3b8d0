"""`orchestrator tune` end to end on the real local Ray cluster: every trial a Ray Train + DeepSpeed job, ASHA,
MLflow parent/child runs and the registry on a real `mlflow server`, resume after a killed driver."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator.cli import EXIT_BAD_INPUT, main
from orchestrator.plan.search import FINISHED, STOPPED_EARLY
from orchestrator.spec import spec_from_dict
from orchestrator.workflows.console import StudyConsole
from orchestrator.workflows.tuning import tune
from tests.tiny import train_workers, write_job

pytestmark = pytest.mark.integration

# 192 examples, 1 worker x 16 = 12 steps per epoch; 2 epochs with an evaluation every 4 steps: 6 evaluations.
STUDY_TRAIN = {"epochs": 2, "micro_batch_size": 16, "eval_every_steps": 4, "learning_rate": 0.01}
# A strong and a hopeless learning rate: the hopeless trials start later and lose at the first rung.
SPACE = {"lora.r": {"grid": [2, 8]}, "train.learning_rate": {"grid": [3e-2, 1e-5]}}


def study_job(job, train=None, **tune_section):
    return job(train={**STUDY_TRAIN, **(train or {})}, scaling={"num_workers": 1}, registry={"name": "tiny-topics"},
               tune={"space": SPACE, "metric": "eval_loss", "seed": 4,  # seed 4 shuffles both good trials first
                     "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2}, **tune_section})


@pytest.fixture(scope="module")
def study(ray_cluster, mlflow_server, tiny_model, tiny_data, tmp_path_factory):
    from ray.util.state import list_actors

    from tests.tiny import tiny_job

    root = tmp_path_factory.mktemp("study")
    raw = study_job(lambda **s: tiny_job(root, tiny_model, tiny_data, **s))
    raw["tracking"] = {"uri": mlflow_server, "experiment": "studies"}
    # the tiny model's folder stands in for shared storage; the study's own cache, so the count below is this study's
    raw["model"] = {**raw["model"], "stage_to_local": "always", "local_cache_dir": str(root / "bases")}
    spec = spec_from_dict(raw)
    output = io.StringIO()
    before = {actor.actor_id for actor in list_actors(limit=10_000)}
    FREE_BEFORE[:] = [ray_cpus_free()]
    result = tune(spec, console=StudyConsole("eval_loss", "min", Console(file=output, width=200)))
    STARTED[:] = [actor.class_name for actor in list_actors(limit=10_000) if actor.actor_id not in before]
    return spec, result, output.getvalue()


STARTED: list[str] = []  # the class of every Ray actor the study started
FREE_BEFORE: list[float] = []  # the cluster's free CPUs before the study (the session's cluster is shared)


def ray_cpus_free() -> float:
    import ray

    return ray.available_resources().get("CPU", 0)


def test_asha_stops_weak_trials_and_trains_fewer_steps_than_running_all(study):
    spec, result, _ = study
    statuses = [o.status for o in result.outcomes]
    assert len(statuses) == 4 and FINISHED in statuses and STOPPED_EARLY in statuses
    evaluations = sum(len(o.history) for o in result.outcomes)
    assert evaluations < 4 * 6  # running the same seeded space to completion takes 6 evaluations per trial
    for outcome in result.outcomes:  # ASHA saw every intermediate evaluation, in order
        steps = [row["step"] for row in outcome.history]
        assert steps == list(range(4, 4 * len(steps) + 1, 4))
    assert result.concurrency == 2  # two one-CPU trials fit the 2-CPU cluster


def test_stopped_trials_free_their_workers(study):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        workers = train_workers()
        if not workers and ray_cpus_free() >= FREE_BEFORE[0]:
            break
        time.sleep(1)
    assert not workers, "Ray Train workers outlived the search"
    assert FREE_BEFORE[0] >= 1, "the study started on a cluster with its CPUs already taken"
    assert ray_cpus_free() >= FREE_BEFORE[0], "CPUs still reserved"


def test_trials_share_the_study_placement_group_watch_instead_of_a_cleaner_process_each(study):
    from orchestrator.runtime import shortcuts

    assert STARTED.count("TrainController") == 4
    if shortcuts.enabled():
        assert STARTED.count("PlacementGroupWatch") == 1 and "PlacementGroupCleaner" not in STARTED, STARTED
    else:  # ORCHESTRATOR_STOCK_RAY=1 (CI runs this test both ways): Ray Train's own cleaner, one per trial
        assert STARTED.count("PlacementGroupCleaner") == 4 and "PlacementGroupWatch" not in STARTED, STARTED


def test_mlflow_holds_a_parent_run_and_one_child_per_trial(study):
    from mlflow import MlflowClient

    spec, result, _ = study
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["orchestrator.best_trial"] == result.best.trial_id
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert sorted(c.data.tags["orchestrator.trial_id"] for c in children) == sorted(o.trial_id for o in result.outcomes)
    by_trial = {o.trial_id: o for o in result.outcomes}
    for child in children:
        outcome = by_trial[child.data.tags["orchestrator.trial_id"]]
        assert child.data.tags["orchestrator.trial_status"] == outcome.status
        assert child.info.status == "FINISHED"
        assert child.data.params["trial.lora.r"] == str(outcome.config["lora.r"])
        assert child.data.params["lora.r"] == str(outcome.config["lora.r"])  # the trial's whole job, as run
        curve = client.get_metric_history(child.info.run_id, "eval_loss")
        assert [m.step for m in curve][: len(outcome.history)] == [row["step"] for row in outcome.history]
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "study")}
    assert {"study/results.csv", "study/results.md", "study/metric_curves.png", "study/metric_by_rank.png",
            "study/lr_by_rank.png", "study/summary.json"} <= artifacts
    assert Path(result.summary_dir, "results.md").read_text().count("\n") == 2 + len(result.outcomes)


def test_the_best_trial_is_registered_as_challenger(study):
    from mlflow import MlflowClient

    spec, result, _ = study
    client = MlflowClient(result.tracking_uri)
    version = client.get_model_version_by_alias("tiny-topics", "challenger")
    assert (version.name, version.version) == result.registered
    assert version.run_id == result.best.run_id and result.best.status == FINISHED
    tags = version.tags
    assert tags["orchestrator.trial_id"] == result.best.trial_id and tags["orchestrator.metric"] == "eval_loss"
    assert json.loads(tags["orchestrator.config"]) == result.best.config
    assert float(tags["orchestrator.eval_loss"]) == pytest.approx(result.best.history[-1]["eval_loss"], rel=1e-5)
    finished = [o for o in result.outcomes if o.status == FINISHED]
    assert result.best.history[-1]["eval_loss"] == min(o.history[-1]["eval_loss"] for o in finished)
    files = {a.path for a in client.list_artifacts(version.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in files and "adapter/adapter_config.json" in files


def test_the_search_reads_the_base_from_model_path_once_and_every_trial_loads_the_node_copy(study):
    """Issue 20.7: 4 trials x 1 worker on the 1-node cluster read model.path once (the staging copy), not 4 times."""
    from mlflow import MlflowClient

    from orchestrator.train.staging import list_source

    spec, result, _ = study
    client = MlflowClient(result.tracking_uri)
    children = client.search_runs([client.get_run(result.parent_run_id).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    model_bytes = sum(f.size for f in list_source(Path(spec.model.path)))
    assert sorted(int(c.data.tags["orchestrator.base_bytes_staged"]) for c in children) == [0, 0, 0, model_bytes]
    cache = Path(spec.model.local_cache_dir)
    assert {Path(c.data.tags["orchestrator.base_loaded_from"]).parent for c in children} == {cache}
    adapter = client.download_artifacts(result.best.run_id, "adapter/adapter_config.json")
    assert json.loads(Path(adapter).read_text())["base_model_name_or_path"] == spec.model.path  # not the copy


def test_the_summary_gives_rank_advice_and_the_console_showed_every_trial(study):
    spec, result, printed = study
    summary = json.loads(Path(result.summary_dir, "summary.json").read_text())
    per_rank = {int(k): v for k, v in summary["rank_advice"]["per_rank"].items()}
    assert set(per_rank) <= {2, 8} and summary["rank_advice"]["rank"] == result.advice.rank
    best = min(per_rank.values())
    assert per_rank[result.advice.rank] <= best * 1.01 and all(
        v > best * 1.01 for r, v in per_rank.items() if r < result.advice.rank)
    for outcome in result.outcomes:
        assert outcome.trial_id in printed
    assert "stopped early" in printed


def test_a_study_whose_trial_cannot_fit_is_refused_before_any_trial(ray_cluster, job, tmp_path, capsys):
    raw = study_job(job)
    raw["scaling"] = {"num_workers": 3}
    assert main(["tune", str(write_job(tmp_path / "job.yaml", raw))]) == EXIT_BAD_INPUT
    message = capsys.readouterr().err
    assert "one trial does not fit the cluster" in message and "3 workers" in message and "only 2 fit" in message
    assert not Path(raw["output_dir"]).exists()


def test_a_bad_search_space_is_refused_naming_the_field(job, tmp_path, capsys):
    raw = study_job(job)
    raw["tune"]["space"] = {"lora.rank": {"grid": [2, 4]}}
    assert main(["tune", str(write_job(tmp_path / "job.yaml", raw))]) == EXIT_BAD_INPUT
    assert "tune.space.lora.rank: not a job field; did you mean 'lora.r'?" in capsys.readouterr().err
    assert not Path(raw["output_dir"]).exists()


def test_a_killed_study_resumes_without_retraining_finished_trials(ray_cluster, job, tmp_path):
    from mlflow import MlflowClient

    # 48 evaluations per trial: a report is taken off the worker at the controller's next poll (every 0.5 s),
    # which paces a tiny trial at ~0.5 s per evaluation; the driver must be killed while the second trial is in
    # the first half of them, a window of ~10 s (12 evaluations left ~3 s, and a clean-clone CI run missed it).
    raw = study_job(job, train={"epochs": 4, "eval_every_steps": 1}, space={"lora.r": {"grid": [2, 4]}}, num_samples=1,
                    max_concurrent_trials=1, scheduler={"name": "fifo"})
    path = write_job(tmp_path / "job.yaml", raw)
    output = Path(raw["output_dir"])
    command = [sys.executable, "-m", "orchestrator", "tune", str(path)]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    driver = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)

    def adapters() -> list[Path]:
        return sorted(output.glob("trials/*/adapter/adapter_model.safetensors"))

    def running_trial_mid_way() -> bool:  # a trial without an adapter yet has reported 1-24 of its 48 evaluations
        for progress in output.glob("tune/*/_trial_entry_*/progress.csv"):
            trial_id = "_".join(progress.parent.name.split("_")[3:5])  # _trial_entry_<study>_<index>_...
            if not (output / "trials" / trial_id / "adapter").exists() and \
                    1 <= len(progress.read_text().splitlines()) - 1 <= 24:
                return True
        return False  # (Tune's progress.csv can lag its trial: a trial with an adapter may show few rows)

    deadline = time.monotonic() + 300
    while not (adapters() and running_trial_mid_way()) and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.2)
    assert adapters() and running_trial_mid_way(), driver.stdout.read().decode()[-3000:]
    os.killpg(driver.pid, signal.SIGKILL)  # mid-search: one trial finished, the second one running
    driver.wait()
    driver.stdout.close()
    assert len(adapters()) == 1
    finished_first = {p: p.stat().st_mtime_ns for p in adapters()}

    rerun = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = next(line for line in rerun.stdout.splitlines() if line.startswith("trials:"))
    assert summary.startswith("trials:  2 (2 finished)"), rerun.stdout[-3000:]
    assert all(p.stat().st_mtime_ns == t for p, t in finished_first.items()), "a finished trial was trained again"
    assert len(adapters()) == 2
    state = json.loads((output / "mlflow_run.json").read_text())
    client = MlflowClient(state["tracking_uri"])
    parent = client.get_run(state["run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{state['run_id']}'")
    assert len(children) == 2 and len(client.search_runs([parent.info.experiment_id])) == 3  # nothing duplicated
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "eval_loss")]
        assert len(steps) == len(set(steps)) or child.data.tags.get("orchestrator.resumed_from_step")

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == EXIT_BAD_INPUT and "pass --resume" in again.stderr


def test_optuna_search_with_median_stopping_samples_inside_the_ranges(ray_cluster, job):
    raw = study_job(job, search="optuna", num_samples=2, metric="eval_accuracy",
                    space={"train.learning_rate": {"loguniform": [1e-3, 3e-2]}, "lora.dropout": {"uniform": [0, 0.2]},
                           "lora.r": {"choice": [2, 4]}},
                    scheduler={"name": "median", "grace_period": 2}, register_best=False)
    result = tune(spec_from_dict(raw), console=StudyConsole("eval_accuracy", "max", Console(file=io.StringIO())))
    assert len(result.outcomes) == 2 and result.registered is None
    for outcome in result.outcomes:
        assert 1e-3 <= outcome.config["train.learning_rate"] <= 3e-2 and 0 <= outcome.config["lora.dropout"] <= 0.2
        assert outcome.config["lora.r"] in (2, 4)
    assert len({o.config["train.learning_rate"] for o in result.outcomes}) == 2  # TPE's start-up samples differ
    assert Path(result.summary_dir, "results.csv").exists()
