"""Registry commands and ``orchestrator retrain`` against a real ``mlflow server`` and a real local Ray cluster.

One tiny model is retrained on dated snapshots in order; each test reads what the earlier steps left in the
registry (module-scoped state, tests in file order): the gate's three outcomes, idempotence, the registry
commands, rollback, continued training from a registry URI, and two retrains racing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from orchestrator.cli import main
from tests.tiny import assert_racing_retrains_end_with_one_champion, tiny_job, write_job, write_tiny_data

pytestmark = pytest.mark.integration

MODEL = "tiny-intents"
SNAPSHOTS = {"2026-01-01": 96, "2026-02-01": 128, "2026-03-01": 160, "2026-04-01": 176, "2026-05-01": 192,
             "2026-06-01": 200}
SECRET = "pw-do-not-log-7731"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model, mlflow_server, ray_cluster):
    """The retrain job file on five snapshots, the MLflow client, and a place for tests to share results."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("retrain")
    for name, rows in SNAPSHOTS.items():
        write_tiny_data(root / "snapshots" / name, train=rows)
    job = tiny_job(root, tiny_model, root / "unused",
                   retrain={"data": {"root": str(root / "snapshots")}, "metric": "accuracy", "margin": 0.02,
                            "minimum": 0.0},
                   registry={"name": MODEL},
                   tracking={"uri": mlflow_server, "experiment": "retrain-tests"},
                   scaling={"num_workers": 1})
    del job["data"]["train"], job["data"]["validation"], job["data"]["test"]
    path = write_job(root / "retrain.yaml", job)
    return {"job": str(path), "root": root, "uri": mlflow_server, "client": MlflowClient(mlflow_server, mlflow_server),
            "ray": ray_cluster}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def registry_cli(capsys, world, *argv: str) -> tuple[int, str, str]:
    return run_cli(capsys, "registry", *argv, "--tracking-uri", world["uri"])


def champion(world) -> str | None:
    return world["client"].get_registered_model(MODEL).aliases.get("champion")


def versions(world) -> list:
    return sorted(world["client"].search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))


def test_first_retrain_makes_the_first_champion(world, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")  # credentials come from the environment only
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    code, out, _ = run_cli(capsys, "retrain", world["job"], "retrain.data.snapshot=2026-01-01",
                           "train.epochs=null", "train.max_steps=1")  # a deliberately weak first champion
    assert code == 0, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("decision: promoted tiny-intents version 1 to @champion on snapshot 2026-01-01")
    assert champion(world) == "1"
    tags = versions(world)[0].tags
    assert tags["orchestrator.decision"] == "first_champion" and tags["orchestrator.snapshot"] == "2026-01-01"
    assert len(tags["orchestrator.data_digest"]) == 64 and float(tags["orchestrator.eval.accuracy"]) > 0
    runs = world["client"].search_runs([world["client"].get_experiment_by_name("retrain-tests").experiment_id])
    decision_runs = [r for r in runs if r.info.run_name == "retrain-2026-01-01"]
    assert len(decision_runs) == 1 and decision_runs[0].data.tags["orchestrator.decision"] == "first_champion"
    written = json.dumps([[r.data.params, r.data.tags] for r in runs] + [v.tags for v in versions(world)])
    assert SECRET not in written and "alice" not in written


def test_a_better_challenger_is_promoted(world, capsys):
    code, out, _ = run_cli(capsys, "retrain", world["job"], "retrain.data.snapshot=2026-02-01")
    assert code == 0, out
    version = versions(world)[-1]
    assert version.version == "2" and champion(world) == "2"
    assert version.tags["orchestrator.decision"] == "promoted"
    tags = version.tags
    assert float(tags["orchestrator.eval.accuracy"]) >= float(tags["orchestrator.champion_value"]) + 0.02
    assert version.tags["orchestrator.champion.previous_version"] == "1"


def test_a_challenger_short_of_the_margin_is_kept_out(world, capsys):
    code, out, _ = run_cli(capsys, "retrain", world["job"], "retrain.data.snapshot=2026-03-01", "retrain.margin=1.0")
    assert code == 3, out
    assert "decision: kept @champion at version 2; challenger is version 3" in out.strip().splitlines()[-1]
    assert champion(world) == "2"
    aliases = world["client"].get_registered_model(MODEL).aliases
    assert aliases["challenger"] == "3" and versions(world)[-1].tags["orchestrator.decision"] == "kept"


def test_rerunning_a_decided_snapshot_registers_nothing(world, capsys):
    before = len(versions(world))
    started = time.monotonic()
    code, out, _ = run_cli(capsys, "retrain", world["job"], "retrain.data.snapshot=2026-03-01", "retrain.margin=1.0")
    assert code == 3 and "decided by an earlier retrain" in out
    assert len(versions(world)) == before and champion(world) == "2"
    assert time.monotonic() - started < 30  # nothing was trained


def test_registry_ls_show_and_pull(world, capsys, tmp_path):
    code, out, _ = registry_cli(capsys, world, "ls")
    rows = [line.split() for line in out.splitlines()[1:] if line.startswith(MODEL)]
    assert code == 0 and [r[1] for r in rows] == ["3", "2", "1"]
    assert "@champion" in rows[1][2] and "@challenger" in rows[0][2] and "accuracy" in out
    code, out, _ = registry_cli(capsys, world, "show", f"models:/{MODEL}@champion", "--json")
    info = json.loads(out)
    assert code == 0 and info["version"] == "2" and info["aliases"] == ["champion"]
    assert info["lineage"]["data_digest"] == versions(world)[1].tags["orchestrator.data_digest"]
    assert info["lineage"]["run_id"] and info["lineage"]["base_model"]
    assert info["params"]["lora.r"] == "4" and "eval_accuracy" in info["metrics"]
    code, out, _ = registry_cli(capsys, world, "pull", f"models:/{MODEL}/2", "--to", str(tmp_path / "adapter"))
    assert code == 0 and (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "labels.json").is_file()
    code, _, err = registry_cli(capsys, world, "pull", f"{MODEL}@champion", "--to", str(tmp_path / "adapter"))
    assert code == 2 and "not empty" in err


def test_rollback_and_promote_record_who_and_why(world, capsys):
    code, out, _ = registry_cli(capsys, world, "rollback", MODEL, "--reason", "v2 misroutes refunds")
    assert code == 0 and "version 2 -> 1" in out and champion(world) == "1"
    tags = world["client"].get_model_version(MODEL, "1").tags
    assert tags["orchestrator.champion.reason"] == "v2 misroutes refunds"
    assert tags["orchestrator.champion.rolled_back_by"]
    code, out, _ = registry_cli(capsys, world, "promote", MODEL, "3", "--alias", "champion", "--reason", "manual")
    assert code == 0 and champion(world) == "3"
    tags = world["client"].get_model_version(MODEL, "3").tags
    assert tags["orchestrator.champion.reason"] == "manual" and tags["orchestrator.champion.previous_version"] == "1"
    assert "@" in tags["orchestrator.champion.promoted_by"]


def test_bad_references_and_unevaluated_versions_are_refused(world, capsys, tmp_path):
    client = world["client"]
    registry_cli(capsys, world, "pull", f"{MODEL}/1", "--to", str(tmp_path / "a"))
    run = client.create_run(client.get_experiment_by_name("retrain-tests").experiment_id)  # no metrics logged
    client.log_artifacts(run.info.run_id, str(tmp_path / "a"), "adapter")
    bare = client.create_model_version(MODEL, f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id).version
    for argv, message in [(("show", "nope@champion"), "no registered model 'nope'"),
                          (("show", f"{MODEL}-x@champion"), f"did you mean '{MODEL}'"),
                          (("show", f"{MODEL}@prod"), "has no alias 'prod'"),
                          (("show", f"models:/{MODEL}/99"), "has no version 99"),
                          (("pull", "models:/../x@a", "--to", "/tmp/never"), "not a registered model reference"),
                          (("promote", MODEL, bare, "--reason", "yolo"), "no evaluation results")]:
        code, _, err = registry_cli(capsys, world, *argv)
        assert code == 2 and message in err, (argv, err)
    assert champion(world) == "3"
    assert not os.path.exists("/tmp/never")
    assert not [m for m in client.search_registered_models() if m.name.endswith(".promotion-lock")]


def test_an_unreachable_registry_fails_in_seconds(capsys):
    started = time.monotonic()
    code = main(["registry", "promote", MODEL, "2", "--reason", "x", "--tracking-uri", "http://127.0.0.1:9"])
    assert code == 2 and "cannot reach the MLflow registry" in capsys.readouterr().err
    assert time.monotonic() - started < 15


def test_training_continues_from_a_registry_uri(world, capsys, tmp_path):
    import yaml

    base = yaml.safe_load(open(world["job"]))
    job = tiny_job(tmp_path, base["model"]["path"], world["root"] / "snapshots" / "2026-02-01")
    job.update(model={**base["model"], "adapter": f"models:/{MODEL}@champion"}, tracking=base["tracking"],
               scaling={"num_workers": 1}, train={**job["train"], "epochs": 1})
    code, out, err = run_cli(capsys, "train", str(write_job(tmp_path / "continue.yaml", job)))
    assert code == 0, err
    started = tmp_path / "out" / "start_adapter" / f"{MODEL}-v3"
    assert (started / "adapter_config.json").is_file()
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == json.loads((started / "adapter_config.json").read_text())["r"]


def test_two_retrains_racing_end_with_one_champion_and_every_version(world):
    assert_racing_retrains_end_with_one_champion(world, MODEL, ("2026-04-01", "2026-05-01"))


KILLED_AT_THE_FIRST_ALIAS_MOVE = """
import os, signal, sys
from orchestrator.tracking import registry
from orchestrator.cli import main
registry.move_alias = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)  # registered; no alias moved
sys.exit(main(sys.argv[1:]))
"""


def test_a_retrain_killed_between_registering_and_moving_aliases_is_finished_exactly_once(world):
    from orchestrator.workflows.retraining import DECISION_RUN_TAG

    client, before, champion_before = world["client"], versions(world), champion(world)
    env = {**os.environ, "RAY_ADDRESS": world["ray"]}
    argv = ["retrain", world["job"], "retrain.data.snapshot=2026-06-01", "retrain.margin=0.0"]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_THE_FIRST_ALIAS_MOVE, *argv], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    new = versions(world)[-1]
    assert len(versions(world)) == len(before) + 1 and DECISION_RUN_TAG not in new.tags
    assert champion(world) == champion_before
    assert client.get_registered_model(MODEL).aliases["challenger"] != new.version
    assert [m for m in client.search_registered_models() if m.name.endswith(".promotion-lock")]  # left by the dead

    def decision_runs():
        experiment = client.get_experiment_by_name("retrain-tests").experiment_id
        return [r for r in client.search_runs([experiment]) if r.info.run_name == "retrain-2026-06-01"]

    promoted = new.tags["orchestrator.decision"] in ("promoted", "first_champion")
    for attempt in range(2):  # the rerun finishes the work; a third run finds nothing left to do
        started = time.monotonic()
        rerun = subprocess.run([sys.executable, "-m", "orchestrator", *argv], env=env, capture_output=True,
                               text=True, timeout=300)
        assert rerun.returncode == (0 if promoted else 3), rerun.stdout[-2000:] + rerun.stderr[-2000:]
        assert "decided by an earlier retrain" in rerun.stdout and time.monotonic() - started < 60, attempt
        model = client.get_registered_model(MODEL)
        assert len(versions(world)) == len(before) + 1
        assert model.aliases["challenger"] == new.version
        assert model.aliases["champion"] == (new.version if promoted else champion_before)
        history = json.loads(model.tags["orchestrator.alias_history.champion"])
        assert history.count(new.version) == (1 if promoted else 0)
        [run] = decision_runs()
        assert client.get_model_version(MODEL, new.version).tags[DECISION_RUN_TAG] == run.info.run_id
        assert not [m for m in client.search_registered_models() if m.name.endswith(".promotion-lock")]
