"""``orchestrator retrain`` of a causal LM against a real ``mlflow server`` and a real local Ray cluster.

A tiny Llama-style model is retrained on dated snapshots of chat data in order; each test reads what the earlier
steps left in the registry (module-scoped state, tests in file order): the gate's three outcomes on the held-out
loss, a gate on exact_match scored from real greedy completions, idempotence, two retrains racing, and a
generation metric on data without reference completions refused before training.
"""

from __future__ import annotations

import json
import time

import pytest

from orchestrator.cli import main
from tests.tiny import assert_racing_retrains_end_with_one_champion, tiny_lm_job, write_job, write_tiny_lm_data

pytestmark = pytest.mark.integration

MODEL = "tiny-chat-topics"
SNAPSHOTS = {"2026-01-01": 64, "2026-02-01": 96, "2026-03-01": 112, "2026-04-01": 120, "2026-05-01": 128}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama, mlflow_server, ray_cluster):
    """The retrain job file on the snapshots (their training chats differ, so do their digests; validation, the
    held-out set, is the same 32 chats in each), the MLflow client, and the cluster's address."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("lm-retrain")
    for name, rows in SNAPSHOTS.items():
        write_tiny_lm_data(root / "snapshots" / name, train=rows)
    job = tiny_lm_job(root, tiny_llama, root / "unused",
                      retrain={"data": {"root": str(root / "snapshots")}, "margin": 0.02},  # metric: the default
                      registry={"name": MODEL}, generation={"num_prompts": 0, "max_new_tokens": 8},
                      tracking={"uri": mlflow_server, "experiment": "lm-retrain-tests"}, scaling={"num_workers": 1})
    del job["data"]["train"], job["data"]["validation"]
    return {"job": str(write_job(root / "retrain.yaml", job)), "root": root, "uri": mlflow_server,
            "client": MlflowClient(mlflow_server, mlflow_server), "ray": ray_cluster}


def retrain(capsys, world, *overrides: str) -> tuple[int, str]:
    code = main(["retrain", world["job"], *overrides])
    return code, capsys.readouterr().out


def champion(world) -> str | None:
    return world["client"].get_registered_model(MODEL).aliases.get("champion")


def versions(world) -> list:
    return sorted(world["client"].search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))


def test_first_retrain_makes_the_first_champion_on_the_held_out_loss(world, capsys):
    code, out = retrain(capsys, world, "retrain.data.snapshot=2026-01-01", "train.epochs=null",
                        "train.max_steps=1")  # a deliberately weak first champion
    assert code == 0, out
    assert out.strip().splitlines()[-1].startswith(f"decision: promoted {MODEL} version 1 to @champion")
    tags = versions(world)[0].tags
    assert champion(world) == "1" and tags["orchestrator.decision"] == "first_champion"
    assert tags["orchestrator.metric"] == "eval_loss" and float(tags["orchestrator.eval.eval_loss"]) > 0
    assert tags["orchestrator.holdout"] == "validation (32 rows)"  # no test file: the validation chats
    client = world["client"]
    runs = client.search_runs([client.get_experiment_by_name("lm-retrain-tests").experiment_id])
    [decision] = [r for r in runs if r.info.run_name == "retrain-2026-01-01"]
    assert decision.data.tags["orchestrator.decision"] == "first_champion"
    assert decision.data.metrics["challenger_eval_loss"] == pytest.approx(float(tags["orchestrator.eval.eval_loss"]))


def test_a_challenger_with_a_lower_held_out_loss_is_promoted(world, capsys):
    code, out = retrain(capsys, world, "retrain.data.snapshot=2026-02-01")
    assert code == 0, out
    version = versions(world)[-1]
    assert version.version == "2" and champion(world) == "2" and version.tags["orchestrator.decision"] == "promoted"
    challenger, champion_value = (float(version.tags[k]) for k in ("orchestrator.eval.eval_loss",
                                                                   "orchestrator.champion_value"))
    assert challenger <= champion_value - 0.02  # lower is better, by the margin
    assert version.tags["orchestrator.champion_version"] == "1"


def test_a_gate_on_exact_match_scores_real_greedy_completions_and_keeps_a_champion_it_cannot_beat(world, capsys):
    code, out = retrain(capsys, world, "retrain.data.snapshot=2026-03-01", "retrain.metric=exact_match",
                        "retrain.margin=1.01",  # exact_match is at most 1: no challenger beats any champion by 1.01
                        "train.epochs=10")  # 3 epochs answer "answer : billing": the words, not yet the form
    assert code == 3, out
    assert "decision: kept @champion at version 2; challenger is version 3" in out.strip().splitlines()[-1]
    version = versions(world)[-1]
    assert champion(world) == "2" and version.tags["orchestrator.decision"] == "kept"
    assert world["client"].get_registered_model(MODEL).aliases["challenger"] == "3"
    recorded = float(version.tags["orchestrator.eval.exact_match"])
    assert recorded == pytest.approx(plain_peft_exact_match(world, "3", max_new_tokens=8))
    assert recorded > 0  # some answers exactly right: the value is not the empty default of a gate that never ran
    assert 0.0 <= float(version.tags["orchestrator.champion_value"]) <= 1.0


def plain_peft_exact_match(world, version: str, max_new_tokens: int) -> float:
    """The version's exact_match on the held-out chats with none of the code under test: PEFT, transformers'
    greedy generate and the tokenizer's chat template."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.tracking import registry

    folder = world["root"] / f"pulled-v{version}"
    registry.pull(world["client"], registry.Ref(MODEL, version=version), str(folder))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(json.loads((folder / "adapter_config.json").read_text())
                                                ["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, folder).eval()
    rows = [json.loads(line) for line in open(world["root"] / "snapshots" / "2026-03-01" / "validation.jsonl")]
    hits = 0
    for row in rows:
        ids = tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += " ".join(answer.split()) == " ".join(row["messages"][1]["content"].split())
    return hits / len(rows)


def test_rerunning_a_decided_snapshot_registers_nothing(world, capsys):
    before, started = len(versions(world)), time.monotonic()
    code, out = retrain(capsys, world, "retrain.data.snapshot=2026-03-01", "retrain.metric=exact_match",
                        "retrain.margin=1.01")
    assert code == 3 and "decided by an earlier retrain" in out
    assert len(versions(world)) == before and champion(world) == "2" and time.monotonic() - started < 30


def test_two_retrains_racing_end_with_one_champion_and_every_version(world):
    assert_racing_retrains_end_with_one_champion(world, MODEL, ("2026-04-01", "2026-05-01"))


def test_a_generation_metric_on_text_data_is_refused_before_training(world, capsys, tmp_path):
    write_tiny_lm_data(tmp_path / "snapshots" / "2026-06-01", kind="text")  # format auto: text, no references
    before = len(versions(world))
    code = main(["retrain", world["job"], f"retrain.data.root={tmp_path / 'snapshots'}", "retrain.metric=contains"])
    err = capsys.readouterr().err
    assert code == 2 and "retrain.metric: contains compares a generated completion" in err, err
    assert len(versions(world)) == before
    assert not (world["root"] / "out" / "snapshots" / "2026-06-01").exists()  # nothing trained
