"""The promotion gate, the snapshot rule, registry references and the retrain spec: pure, no MLflow, no Ray."""

from __future__ import annotations

import pytest

from orchestrator.plan.promotion import FIRST, KEPT, PROMOTED, decide, pick_snapshot, rollback_target, snapshot_job
from orchestrator.spec import RetrainSpec, SnapshotSpec, SpecError, spec_from_dict
from orchestrator.tracking.registry import Ref, RegistryError, parse_ref
from orchestrator.train.data import resolve_snapshot
from orchestrator.train.lm_data import prompt_text, reference_text
from orchestrator.train.metrics import generation_metrics
from tests.tiny import write_tiny_data

DATES = ["2026-09-30", "2026-11-01", "2026-10-15", "notes", "2026-11-01-partial.tmp"]


def rule(**fields) -> RetrainSpec:
    return RetrainSpec(data=SnapshotSpec(root="/data"), **fields)


@pytest.mark.parametrize(("pattern", "pinned", "expected"), [
    ("20??-??-??", None, "2026-11-01"),  # the greatest matching name; 'partial' folders do not match
    ("2026-10-*", None, "2026-10-15"),
    ("20??-??-??", "2026-09-30", "2026-09-30"),  # a backfill
])
def test_snapshot_rule_picks_the_newest_matching_or_the_pinned_folder(pattern, pinned, expected):
    assert pick_snapshot(DATES, SnapshotSpec(root="/d", pattern=pattern, snapshot=pinned)) == expected


@pytest.mark.parametrize(("pattern", "pinned", "field"), [("1999-*", None, "retrain.data.pattern"),
                                                          ("20??-??-??", "2026-12-01", "retrain.data.snapshot")])
def test_snapshot_rule_names_the_field_when_nothing_matches(pattern, pinned, field):
    with pytest.raises(SpecError, match=field):
        pick_snapshot(DATES, SnapshotSpec(root="/d", pattern=pattern, snapshot=pinned))


def test_snapshot_digest_follows_the_bytes(tmp_path):
    write_tiny_data(tmp_path / "2026-01-01", train=32)
    first = resolve_snapshot(SnapshotSpec(root=str(tmp_path)))
    assert resolve_snapshot(SnapshotSpec(root=str(tmp_path))).digest == first.digest
    with open(tmp_path / "2026-01-01" / "train.jsonl", "a") as handle:
        handle.write('{"text": "one more", "label": "billing"}\n')
    assert resolve_snapshot(SnapshotSpec(root=str(tmp_path))).digest != first.digest
    (tmp_path / "2026-01-01" / "validation.jsonl").unlink()
    with pytest.raises(SpecError, match="retrain.data.validation"):
        resolve_snapshot(SnapshotSpec(root=str(tmp_path)))


@pytest.mark.parametrize(("fields", "challenger", "champion", "outcome"), [
    ({}, 0.70, None, FIRST),  # no champion, no minimum
    ({"minimum": 0.8}, 0.85, None, FIRST),
    ({"minimum": 0.8}, 0.75, None, KEPT),
    ({"margin": 0.01}, 0.92, 0.90, PROMOTED),
    ({"margin": 0.01}, 0.905, 0.90, KEPT),  # better, but not by the margin
    ({"margin": 0.0}, 0.90, 0.90, PROMOTED),  # a tie passes a zero margin
    ({"margin": 0.01}, 0.80, 0.90, KEPT),
    ({"metric": "loss", "margin": 0.05}, 0.30, 0.40, PROMOTED),  # loss: lower is better
    ({"metric": "loss", "margin": 0.05}, 0.38, 0.40, KEPT),
    ({"metric": "loss", "minimum": 0.5}, 0.6, None, KEPT),
])
def test_gate_outcomes(fields, challenger, champion, outcome):
    decision = decide(rule(**fields), challenger, champion, "3" if champion is not None else None)
    assert decision.outcome == outcome
    assert decision.promote == (outcome != KEPT)
    assert f"{challenger:.4f}" in decision.reason


@pytest.mark.parametrize(("history", "current", "target", "trail"), [
    (["1", "2", "3"], "3", "2", ["1", "2"]),
    (["1", "2", "2"], "2", "1", ["1"]),  # the same version promoted twice still rolls back past it
    (["4", "5"], "7", "5", ["4", "5"]),  # the alias moved outside history: back to the last recorded one
])
def test_rollback_goes_to_the_previous_holder(history, current, target, trail):
    assert rollback_target(history, current) == (target, trail)


def test_rollback_without_history_is_refused():
    with pytest.raises(SpecError, match="no previous version"):
        rollback_target(["3"], "3")


@pytest.mark.parametrize(("text", "ref"), [
    ("models:/intents@champion", Ref("intents", alias="champion")),
    ("models:/intents/7", Ref("intents", version="7")),
    ("intents@challenger", Ref("intents", alias="challenger")),
    ("intents", Ref("intents")),
])
def test_registry_references(text, ref):
    assert parse_ref(text) == ref


@pytest.mark.parametrize("text", ["models:/../etc@x", "models:/a/b/c", "models:/team/intents", "models:/x@",
                                  "models:/x.promotion-lock", "models:/intents/latest"])
def test_bad_registry_references_are_refused(text):
    with pytest.raises(RegistryError, match="models:/NAME"):
        parse_ref(text)


def test_snapshot_job_trains_in_its_own_folder_and_never_registers_from_a_search(job, tmp_path):
    write_tiny_data(tmp_path / "snaps" / "2026-02-01", train=32)
    spec = spec_from_dict(job(retrain={"data": {"root": str(tmp_path / "snaps")}, "challenger": "search"},
                              tune={"space": {"lora.r": {"grid": [2, 4]}}, "search": "grid"}))
    snapshot = resolve_snapshot(spec.retrain.data)
    trial = snapshot_job(spec, snapshot, "http://127.0.0.1:5000")
    assert trial.data.train == snapshot.files["train"] and trial.data.test == snapshot.files["test"]
    assert trial.output_dir.endswith("snapshots/2026-02-01") and trial.tracking.run_name == "tiny-2026-02-01"
    assert trial.tracking.uri == "http://127.0.0.1:5000"  # one store for every snapshot
    assert trial.tune.register_best is False  # the gate registers, not the search


@pytest.mark.parametrize(("sections", "field"), [
    ({"retrain": {"data": {"root": "/x"}, "challenger": "search"}}, "retrain.challenger"),
    ({"retrain": {"data": {"root": "/x"}, "margin": -0.1}}, "retrain.margin"),
    ({"tracking": {"uri": "https://alice:s3cret@mlflow.example.com"}}, "tracking"),
    ({"registry": {"name": "../../etc"}}, "registry.name"),
    ({"registry": {"champion_alias": "prod/main"}}, "registry.champion_alias"),
])
def test_retrain_and_registry_spec_errors_name_the_field(job, sections, field):
    with pytest.raises(SpecError, match=field) as error:
        spec_from_dict(job(**sections))
    assert "s3cret" not in str(error.value)


@pytest.mark.parametrize(("task", "metric", "accepted"), [
    ("causal_lm", "eval_loss", True), ("causal_lm", "eval_perplexity", True), ("causal_lm", "exact_match", True),
    ("causal_lm", "contains", True), ("causal_lm", "accuracy", False), ("causal_lm", "loss", False),
    ("sequence_classification", "exact_match", False), ("sequence_classification", "eval_loss", False),
    ("sequence_classification", "macro_f1", True),
])
def test_the_gate_metric_must_be_one_the_task_has(job, task, metric, accepted):
    raw = job(model={"task": task}, retrain={"data": {"root": "/x"}, "metric": metric})
    if accepted:
        assert spec_from_dict(raw).retrain.metric == metric
        return
    with pytest.raises(SpecError, match=f"retrain.metric: a {task} job has no {metric}"):
        spec_from_dict(raw)


@pytest.mark.parametrize(("task", "default"), [("causal_lm", "eval_loss"), ("sequence_classification", "accuracy")])
def test_the_gate_metric_defaults_to_one_the_task_has(job, task, default):
    assert spec_from_dict(job(model={"task": task}, retrain={"data": {"root": "/x"}})).retrain.metric == default


@pytest.mark.parametrize("metric", ["exact_match", "contains"])
def test_a_generation_gate_on_text_data_is_refused(job, metric):
    raw = job(model={"task": "causal_lm"}, data={"format": "text"}, retrain={"data": {"root": "/x"}, "metric": metric})
    with pytest.raises(SpecError, match="retrain.metric: .*text data has no reference completions"):
        spec_from_dict(raw)


@pytest.mark.parametrize(("metric", "challenger", "champion", "outcome"), [
    ("eval_loss", 1.20, 1.30, PROMOTED), ("eval_loss", 1.29, 1.30, KEPT),  # lower is better, by the margin
    ("eval_perplexity", 3.0, 3.5, PROMOTED), ("eval_perplexity", 3.6, 3.5, KEPT),
    ("exact_match", 0.75, 0.70, PROMOTED), ("exact_match", 0.72, 0.70, KEPT),  # higher is better
    ("contains", 0.90, 0.80, PROMOTED), ("contains", 0.70, 0.80, KEPT),
])
def test_causal_lm_gate_directions(metric, challenger, champion, outcome):
    assert decide(rule(metric=metric, margin=0.05), challenger, champion, "1").outcome == outcome


def test_generation_metrics_compare_whitespace_normalised_text():
    completions = ["  topic :\nbilling ", "topic : billing, I think", "Topic : billing", "topic : login"]
    references = ["topic : billing"] * 4
    scores = generation_metrics(completions, references)
    assert scores == {"exact_match": 0.25, "contains": 0.5}  # case counts; extra words fail exact_match only
    assert generation_metrics([], []) == {"exact_match": 0.0, "contains": 0.0}
    with pytest.raises(ValueError):
        generation_metrics(["a"], [])  # a completion without its reference is a bug, not a miss


def test_held_out_prompts_leave_out_the_reference_answer(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    chat = {"messages": [{"role": "user", "content": "question : my invoice"},
                         {"role": "assistant", "content": "topic : billing"}]}
    assert reference_text(chat) == "topic : billing" and "billing" not in prompt_text(chat, tokenizer)
    assert prompt_text(chat, tokenizer).endswith("<|im_start|>assistant\n")  # as training renders the turn
    pair = {"prompt": "question : my invoice answer :", "completion": " topic : billing"}
    assert (prompt_text(pair, tokenizer), reference_text(pair)) == (pair["prompt"], pair["completion"])
    assert reference_text({"text": "question : my invoice topic : billing"}) is None
