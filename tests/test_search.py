"""The search's pure decisions: space validation, trial jobs, concurrency, outcomes, rank advice, summary files."""

from __future__ import annotations

import csv
import json

import pytest

from orchestrator.plan.placement import concurrency, trials_that_fit
from orchestrator.plan.search import FAILED, FINISHED, STOPPED_EARLY, TrialOutcome, classify, rank_advice
from orchestrator.spec import SpecError, spec_from_dict
from orchestrator.spec.space import grid_points, num_trials, searchable_fields, trial_spec
from orchestrator.workflows.report import write_summary

SPACE = {"lora.r": {"grid": [2, 4]}, "train.learning_rate": {"loguniform": [1e-4, 1e-2]}}


def study(job, **tune):
    return job(tune={"space": SPACE, **tune})


def error_of(raw: dict) -> str:
    with pytest.raises(SpecError) as caught:
        spec_from_dict(raw)
    return str(caught.value)


def test_a_valid_study_parses(job):
    spec = spec_from_dict(study(job))
    assert spec.tune.space["lora.r"].kind == "grid" and spec.tune.direction() == "max"
    assert num_trials(spec) == 2  # the grid axis times num_samples
    assert num_trials(spec_from_dict(study(job, num_samples=3))) == 6


@pytest.mark.parametrize("space, expected", [
    ({"lora.rank": {"grid": [2]}}, "tune.space.lora.rank: not a job field; did you mean 'lora.r'?"),
    ({"train.learning_rte": {"uniform": [0.1, 0.2]}}, "did you mean 'train.learning_rate'?"),
    ({"scaling.num_workers": {"grid": [1, 2]}}, "tune.space.scaling.num_workers: cannot be searched"),
    ({"output_dir": {"choice": ["a", "b"]}}, "tune.space.output_dir: cannot be searched"),
    ({"lora.r": {"grid": [4, 0]}}, "tune.space.lora.r: value 0 makes an invalid job"),
    ({"lora.dropout": {"uniform": [0.1, 1.5]}}, "tune.space.lora.dropout: value 1.5 makes an invalid job"),
    ({"train.scheduler": {"choice": ["linear", "exponential"]}}, "value 'exponential' makes an invalid job"),
    ({"lora.r": {"randint": [8, 4]}}, "tune.space.lora.r: Value error, randint: low must be below high"),
    ({"train.learning_rate": {"loguniform": [0, 1e-2]}}, "loguniform: low must be > 0"),
    ({"lora.r": {"grid": [2], "choice": [4]}}, "give exactly one of choice, grid, uniform, loguniform, randint"),
    ({"lora.r": {"gird": [2]}}, "tune.space.lora.r.gird: unknown key; did you mean 'grid'?"),
])
def test_bad_search_spaces_are_rejected_naming_the_field(job, space, expected):
    assert expected in error_of(job(tune={"space": space}))


@pytest.mark.parametrize("tune, expected", [
    ({"metric": "eval_loss", "mode": "max"}, "tune.mode: eval_loss is best minimised; set mode: min"),
    ({"search": "grid", "space": {"train.learning_rate": {"uniform": [0.1, 0.2]}}},
     "tune.search: grid search needs every dimension as grid or choice"),
    ({"metric": "accuracy"}, "tune.metric"),
    ({"schedular": {}}, "tune.schedular: unknown key; did you mean 'scheduler'?"),
    ({"scheduler": {"name": "pbt"}}, "tune.scheduler.name"),
    ({"scheduler": {"reduction_factor": 1}}, "tune.scheduler.reduction_factor"),
    ({"max_concurrent_trials": 0}, "tune.max_concurrent_trials"),
    ({"space": {}}, "tune.space"),
])
def test_bad_tune_sections_are_rejected_naming_the_field(job, tune, expected):
    assert expected in error_of(job(tune={"space": SPACE, **tune}))


def test_checkpoints_must_fall_on_evaluations_in_a_study(job):
    raw = study(job)
    raw["train"] = {**raw["train"], "eval_every_steps": 4, "checkpoint_every_steps": 6}
    assert "train.checkpoint_every_steps: in a search, checkpoint at evaluation steps" in error_of(raw)


def test_searchable_fields_cover_the_training_knobs_but_not_identity_or_resources():
    fields = searchable_fields()
    assert {"lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "train.learning_rate",
            "train.micro_batch_size", "deepspeed.zero_stage"} <= set(fields)
    assert not [f for f in fields if f.split(".")[0] in ("name", "output_dir", "scaling", "tune", "tracking")]


def test_a_trial_job_is_the_study_job_with_the_trial_values(job, tmp_path):
    spec = spec_from_dict(study(job))
    trial = trial_spec(spec, {"lora.r": 2, "train.learning_rate": 3e-3, "lora.target_modules": ["query"]},
                       str(tmp_path / "t1"), "abc_00001")
    assert (trial.lora.r, trial.train.learning_rate, trial.lora.target_modules) == (2, 3e-3, ["query"])
    assert trial.tune is None and trial.output_dir == str(tmp_path / "t1")
    assert trial.name == "tiny-abc_00001" and trial.run_name() == "tiny-abc_00001"
    assert (trial.lora.alpha, trial.train.epochs, trial.data) == (spec.lora.alpha, spec.train.epochs, spec.data)


@pytest.mark.parametrize("nodes, per_worker, workers, strategy, expected", [
    ([{"CPU": 2}], {"CPU": 1}, 1, "PACK", 2),
    ([{"CPU": 2}], {"CPU": 1}, 2, "PACK", 1),
    ([{"CPU": 2}], {"CPU": 2}, 2, "PACK", 0),
    ([{"CPU": 3}, {"CPU": 3}], {"CPU": 1}, 2, "PACK", 3),
    ([{"CPU": 3}, {"CPU": 3}], {"CPU": 1}, 2, "STRICT_PACK", 2),  # one worker per node left over, unusable
    ([{"CPU": 3}, {"CPU": 1}], {"CPU": 1}, 2, "STRICT_SPREAD", 1),
    ([{"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 2}], {"CPU": 1, "GPU": 1}, 2, "SPREAD", 2),  # GPUs bound it
])
def test_trials_that_fit_respect_node_boundaries_and_strategy(nodes, per_worker, workers, strategy, expected):
    assert trials_that_fit(nodes, per_worker, workers, strategy) == expected


def test_concurrency_is_what_fits_capped_by_the_request_and_the_trial_count():
    assert concurrency("auto", 4, 16) == 4
    assert concurrency(2, 4, 16) == 2
    assert concurrency(8, 4, 16) == 4  # more than fit would leave trials waiting on each other
    assert concurrency("auto", 4, 3) == 3


def test_a_trial_is_finished_only_when_it_trained_every_step():
    assert classify(72, 72, errored=False) == FINISHED
    assert classify(24, 72, errored=False) == STOPPED_EARLY
    assert classify(72, 72, errored=True) == FAILED


def outcome(trial_id, rank, lr, values, status=FINISHED):
    history = [{"step": 10 * (i + 1), "eval_accuracy": v, "eval_loss": 1 - v} for i, v in enumerate(values)]
    return TrialOutcome(trial_id, {"lora.r": rank, "train.learning_rate": lr}, status, history,
                        wall_seconds=100.0, train_seconds=80.0)


def test_rank_advice_names_the_smallest_rank_within_tolerance():
    outcomes = [outcome("a", 4, 1e-3, [0.5, 0.895]), outcome("b", 8, 1e-3, [0.6, 0.90]),
                outcome("c", 16, 1e-3, [0.7, 0.902]), outcome("d", 2, 1e-3, [0.3, 0.80], STOPPED_EARLY)]
    advice = rank_advice(outcomes, 8, "eval_accuracy", "max", tolerance=0.01)
    assert (advice.rank, advice.best_rank) == (4, 16) and advice.per_rank[2] == 0.80
    assert rank_advice(outcomes, 8, "eval_accuracy", "max", tolerance=0.003).rank == 8
    assert rank_advice(outcomes, 8, "eval_accuracy", "max", tolerance=0.001).rank == 16
    assert rank_advice(outcomes, 8, "eval_loss", "min", tolerance=0.05).rank == 8  # 0.100 within 5% of 0.098
    assert "use rank 4" in advice.sentence("eval_accuracy")


def test_rank_advice_without_a_searched_rank_uses_the_jobs_rank():
    outcomes = [TrialOutcome("a", {"train.learning_rate": 1e-3}, FINISHED, [{"step": 1, "eval_accuracy": 0.5}])]
    assert rank_advice(outcomes, 8, "eval_accuracy", "max", 0.01).rank == 8


def test_summary_files_hold_every_trial_and_the_plots(tmp_path):
    outcomes = [outcome("a", 4, 1e-3, [0.5, 0.9]), outcome("b", 16, 3e-4, [0.2], STOPPED_EARLY)]
    advice = rank_advice(outcomes, 8, "eval_accuracy", "max", 0.01)
    files = write_summary(tmp_path, outcomes, "eval_accuracy", "max", outcomes[0], advice, {"study": "s"})
    rows = list(csv.DictReader(open(files["csv"])))
    assert [r["trial"] for r in rows] == ["a", "b"] and rows[1]["status"] == STOPPED_EARLY
    assert rows[0]["overhead"] == "20%"
    assert "| a | finished | 4 |" in open(files["markdown"]).read()
    for name in ("curves", "rank", "lr_rank"):
        assert open(files[name], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(open(files["json"]).read())
    assert summary["best"]["trial"] == "a" and summary["rank_advice"]["rank"] == 4 and summary["total_steps"] == 30


def test_grid_points_are_every_combination_in_a_seeded_shuffled_order(job):
    space = {"lora.r": {"grid": [2, 4, 8, 16]}, "train.learning_rate": {"grid": [1e-4, 1e-3, 1e-2]},
             "lora.dropout": {"uniform": [0.0, 0.1]}}
    spec = spec_from_dict(job(tune={"space": space, "num_samples": 2, "seed": 5}))
    points = grid_points(spec)
    combos = {(p["lora.r"], p["train.learning_rate"]) for p in points}
    assert len(points) == num_trials(spec) == 24 and len(combos) == 12
    assert all("lora.dropout" not in p for p in points)  # sampled per trial, not part of the grid
    assert points[:12] != points[12:]  # each repeat has its own order
    nested = [(r, lr) for r in (2, 4, 8, 16) for lr in (1e-4, 1e-3, 1e-2)]
    assert [(p["lora.r"], p["train.learning_rate"]) for p in points[:12]] != nested
    assert grid_points(spec) == points  # same seed, same order


def test_a_resumed_trial_finds_its_child_run_again_and_delivers_what_its_worker_left(job, tmp_path):
    from pathlib import Path

    from mlflow import MlflowClient

    from orchestrator.tracking import runs as tracking
    from orchestrator.tracking.sinks import PENDING_FILE

    spec = spec_from_dict(study(job))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    parent = client.create_run(client.create_experiment("study", artifact_location=str(tmp_path / "art"))).info.run_id
    trial = trial_spec(spec, {"lora.r": 2}, str(tmp_path / "t1"), "abc_00001")
    first = tracking.start_trial_run(uri, parent, "abc_00001", trial, {"lora.r": 2})
    pending = Path(trial.output_dir, PENDING_FILE)  # what a worker cut off from the server left behind
    pending.parent.mkdir(parents=True)
    pending.write_text(json.dumps({"call": "log_metrics", "args": [{"eval_loss": 0.5}, 7]}) + "\n")

    again = tracking.start_trial_run(uri, parent, "abc_00001", trial, {"lora.r": 2})  # the resumed study's trial
    assert again == first and tracking.trial_runs(uri, parent) == {"abc_00001": first}
    assert [(m.step, m.value) for m in client.get_metric_history(first, "eval_loss")] == [(7, 0.5)]
    assert not pending.exists() and client.get_run(first).data.params["trial.lora.r"] == "2"


def test_the_study_plan_runs_what_fits_at_once_within_the_cap_with_an_evaluation_budget(job):
    from orchestrator.plan.batches import plan_batches
    from orchestrator.plan.search import plan_study

    spec = spec_from_dict(study(job, num_samples=3))  # 2 grid points x 3 samples = 6 trials
    batches = plan_batches(spec, 192)
    nodes = [{"CPU": 4, "memory": 2**34}, {"CPU": 2, "memory": 2**34}]
    plan = plan_study(spec, nodes, batches)
    per_trial = spec.scaling.num_workers * spec.scaling.cpus_per_worker
    assert plan.trials == 6 and plan.fitting == int(6 // per_trial) and plan.concurrency == min(6, plan.fitting)
    assert plan.max_intervals == -(-batches.total_steps // batches.eval_every_steps)  # one per evaluation
    capped = plan_study(spec_from_dict(study(job, num_samples=3, max_concurrent_trials=1)), nodes, batches)
    assert capped.concurrency == 1 and capped.fitting == plan.fitting
    budget = plan_study(spec_from_dict(study(job, scheduler={"name": "asha", "max_intervals": 3})), nodes, batches)
    assert budget.max_intervals == 3 and budget.trials == 2
    assert "2 trials" in budget.sentence(spec) and "budget 3 evaluations" in budget.sentence(spec)


def test_a_trials_outcome_comes_from_its_evaluations_against_its_own_step_budget(job):
    from orchestrator.plan.batches import plan_batches
    from orchestrator.plan.search import TrialRecord, best_finished, trial_outcome

    spec = spec_from_dict(study(job, metric="eval_loss"))
    total = plan_batches(spec, 192).total_steps
    progress = {"step": 1, "train_loss": 2.0}  # a report without the metric is not an evaluation
    evals = [{"step": s, "eval_loss": 1.0 / s, "train_seconds": 2.0 * s, "evaluation_seconds": 0.5 * s}
             for s in range(2, total + 1, 2)]
    done = TrialRecord("a", {"lora.r": 2}, [progress, *evals], None, 30.0)
    cut = TrialRecord("b", {"lora.r": 4}, [progress, *evals[:1]], None, 9.0)
    broken = TrialRecord("c", {"lora.r": 4}, [progress], "boom", 3.0)
    outcomes = [trial_outcome(spec, r, 192, f"run-{r.trial_id}") for r in (done, cut, broken)]
    assert [o.status for o in outcomes] == [FINISHED, STOPPED_EARLY, FAILED]
    assert outcomes[0].history == evals and outcomes[0].steps == evals[-1]["step"]
    assert outcomes[0].train_seconds == evals[-1]["train_seconds"] and outcomes[0].wall_seconds == 30.0
    assert trial_outcome(spec, done, 192, None, wall_seconds=12.5).wall_seconds == 12.5  # the driver's clock wins
    assert outcomes[2].error == "boom" and outcomes[1].run_id == "run-b"
    # the trial's own job decides its budget: twice the epochs, the same steps are no longer all of it
    longer = TrialRecord("d", {"train.epochs": spec.train.epochs * 2}, [progress, *evals], None, 30.0)
    assert trial_outcome(spec, longer, 192, None).status == STOPPED_EARLY
    assert best_finished(outcomes, "eval_loss", "min") is outcomes[0]  # only a finished trial's adapter is kept
    assert best_finished(outcomes[1:], "eval_loss", "min") is None
