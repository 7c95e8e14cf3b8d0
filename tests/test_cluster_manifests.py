"""The cluster files under cluster/, checked offline by invariant: no Ray started, no Kubernetes, no network.

KubeRay objects have the shape the operator needs; every Ray process and client has token auth from a Secret;
nothing is exposed publicly; no credential is written down; every `orchestrator` command line in a manifest,
the launcher config, a README code block or an example comment (a YAML comment line indented by 3+ spaces)
parses with the real CLI and names job files that validate; the launcher config passes Ray's own schema.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import build_parser
from orchestrator.spec import load_spec
from tests.conftest import REPO

CLUSTER = REPO / "cluster"
YAML_FILES = sorted(CLUSTER.rglob("*.yaml"))
DOCS = [(path.relative_to(REPO), doc) for path in YAML_FILES
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
KUBE = [(path, doc) for path, doc in DOCS if "apiVersion" in doc]
LAUNCHERS = [(path, doc) for path, doc in DOCS if "provider" in doc]
KINDS = {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("batch/v1", "CronJob"),
         ("v1", "PersistentVolumeClaim")}
SECRETS = {"RAY_AUTH_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"}
CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]  # minute hour day-of-month month day-of-week


def of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(path, doc) for path, doc in KUBE if doc["kind"] == kind]


def cluster_specs() -> list[tuple[str, dict]]:
    """Every Ray cluster described: RayCluster specs and the clusters RayJobs create."""
    specs = [(f"{path}:{doc['metadata']['name']}", doc["spec"]) for path, doc in of_kind("RayCluster")]
    return specs + [(f"{path}:{doc['metadata']['name']}", doc["spec"]["rayClusterSpec"])
                    for path, doc in of_kind("RayJob") if "rayClusterSpec" in doc["spec"]]


def pod_specs(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def ray_clients() -> list[tuple[str, dict]]:
    """(where, container-like dict with env) for everything that talks to Ray: head, workers, the autoscaler
    sidecar, RayJob submitters and the CronJob's pod."""
    found = []
    for where, spec in cluster_specs():
        found += [(f"{where}:{c['name']}", c) for pod in pod_specs(spec) for c in pod["containers"]]
        if spec.get("enableInTreeAutoscaling"):
            found.append((f"{where}:autoscaler", spec.get("autoscalerOptions", {})))
    for path, doc in of_kind("RayJob"):
        pod = doc["spec"].get("submitterPodTemplate", {}).get("spec", {"containers": [{"name": "default"}]})
        found += [(f"{path}:submitter:{c['name']}", c) for c in pod["containers"]]
    for path, doc in of_kind("CronJob"):
        found += [(f"{path}:{c['name']}", c) for c in cron_containers(doc)]
    return found


def cron_containers(doc: dict) -> list[dict]:
    return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]


def walk(node):
    """Every dict and string inside a loaded YAML document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)
    elif isinstance(node, str):
        yield node


def env_of(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


# ---------------------------------------------------------------------------------------------- shapes


def test_every_file_loads_and_every_kind_is_known():
    assert {(doc["apiVersion"], doc["kind"]) for _, doc in KUBE} == KINDS
    assert len(of_kind("RayJob")) == 2 and len(LAUNCHERS) == 1
    assert len(DOCS) == len(KUBE) + len(LAUNCHERS), "a YAML document that is neither a Kubernetes object nor a launcher"


@pytest.mark.parametrize("where, spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_ray_clusters_autoscale_gpu_workers_and_keep_training_off_the_head(where, spec):
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["maxReplicas"] and group["maxReplicas"] > 0, group["groupName"]
    assert any(c["resources"]["limits"].get("nvidia.com/gpu", 0) >= 1
               for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])
    for pod in pod_specs(spec):
        for container in pod["containers"]:
            resources = container["resources"]
            assert container["image"] and {"cpu", "memory"} <= resources["requests"].keys(), container["name"]
            assert resources["requests"] == resources["limits"], f"{container['name']}: requests != limits"


@pytest.mark.parametrize("where, spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_gpu_worker_pods_hold_a_whole_nodes_gpus_and_ray_counts_them(where, spec):
    """One pod per GPU node with all its GPUs, as Ray Train expects: it shows a run's workers on a node all the
    GPUs the run holds there (local rank r on cuda:r, NCCL peer access). One-GPU pods hide a worker that sees only
    its own GPU. Ray's counts (rayStartParams), where written, are the container's limits."""
    groups = [g for g in spec["workerGroupSpecs"]
              if any(c["resources"]["limits"].get("nvidia.com/gpu", 0) for c in g["template"]["spec"]["containers"])]
    assert groups
    for group in groups:
        [container] = group["template"]["spec"]["containers"]
        limits, params = container["resources"]["limits"], group["rayStartParams"]
        assert int(limits["nvidia.com/gpu"]) >= 2, f"{group['groupName']}: one GPU per pod"
        assert params.get("num-gpus", str(limits["nvidia.com/gpu"])) == str(limits["nvidia.com/gpu"])
        assert params.get("num-cpus", str(limits["cpu"])) == str(limits["cpu"])


@pytest.mark.parametrize("path, job", of_kind("RayJob"), ids=[str(p) for p, _ in of_kind("RayJob")])
def test_ray_jobs_have_an_entrypoint_and_one_cluster(path, job):
    spec = job["spec"]
    assert spec["entrypoint"].strip()
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec)
    if "rayClusterSpec" in spec:  # a cluster of its own is deleted after the job
        assert spec["shutdownAfterJobFinishes"] is True and isinstance(spec["ttlSecondsAfterFinished"], int)


def test_retrain_cronjob_runs_nightly_one_at_a_time():
    [(_, cron)] = of_kind("CronJob")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid" and spec["startingDeadlineSeconds"] > 0
    assert 0 <= spec["jobTemplate"]["spec"]["backoffLimit"] <= 3
    assert cron_containers(cron)[0]["image"] and cron_containers(cron)[0]["command"]


@pytest.mark.parametrize("code, expected", [(0, 0), (3, 0), (1, 1), (2, 2)])
def test_retrain_cronjob_treats_challenger_kept_out_as_success(tmp_path, code, expected):
    """orchestrator retrain exits 3 when the champion stays: a normal night, not a failed Job."""
    [(_, cron)] = of_kind("CronJob")
    fake = tmp_path / "orchestrator"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/argv\nexit {code}\n')
    fake.chmod(0o755)
    command = cron_containers(cron)[0]["command"]
    done = subprocess.run(command, env={"PATH": f"{tmp_path}:/usr/bin:/bin"}, capture_output=True, timeout=30)
    assert done.returncode == expected, done.stderr
    assert (tmp_path / "argv").read_text().startswith("submit jobs/intent_retrain.yaml")


# ---------------------------------------------------------------------------------------------- security


@pytest.mark.parametrize("where, container", ray_clients(), ids=[w for w, _ in ray_clients()])
def test_token_auth_on_every_ray_container(where, container):
    env = env_of(container)
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token"
    token = env.get("RAY_AUTH_TOKEN", {})
    assert "value" not in token and token.get("valueFrom", {}).get("secretKeyRef", {}).get("key")


def test_nothing_is_exposed_publicly():
    for path, doc in KUBE:
        assert doc["kind"] != "Ingress", path
        for node in walk(doc):
            if isinstance(node, dict):
                assert node.get("type") not in ("LoadBalancer", "NodePort"), path
                assert node.get("serviceType", "ClusterIP") == "ClusterIP", path
    for path, launcher in LAUNCHERS:
        [head_start] = [c for c in launcher["head_start_ray_commands"] if "ray start" in c]
        assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in json.dumps(launcher), path


def test_the_local_cluster_script_starts_every_node_with_token_auth_and_a_loopback_dashboard():
    script = (CLUSTER / "local_cluster.sh").read_text(encoding="utf-8")
    assert re.search(r"^\s*export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=", script, re.MULTILINE)
    [head] = re.findall(r'"\$RAY" start --head[^\n]*', script)
    assert "--dashboard-host 127.0.0.1" in head and "0.0.0.0" not in script


def test_no_credential_is_written_down():
    for path, doc in KUBE:
        for node in walk(doc):
            if isinstance(node, dict) and node.get("name") in SECRETS:
                assert "value" not in node and "secretKeyRef" in node["valueFrom"], f"{path}: {node['name']}"
    literal = re.compile(r"(MLFLOW_TRACKING_(PASSWORD|TOKEN)|RAY_AUTH_TOKEN)=(?!['\"]?\$)\S|://[^/\s@:]+:[^/\s@]+@")
    for path in [*YAML_FILES, CLUSTER / "README.md"]:
        assert not literal.search(path.read_text(encoding="utf-8")), path


# ---------------------------------------------------------------------------------------------- launcher


def test_launcher_config_passes_rays_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    for _, launcher in LAUNCHERS:
        jsonschema.validate(launcher, schema)
        validate_config(prepare_config(launcher))  # what `ray up` runs: defaults filled, cross-field rules


def test_launcher_starts_every_node_with_the_uploaded_token_and_gpu_workers_from_zero():
    [(_, launcher)] = LAUNCHERS
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        [start] = [c for c in launcher[key] if "ray start" in c]
        assert "RAY_AUTH_MODE=token" in start, key
        token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+?);?\s", start).group(1)
        assert token_path in launcher["file_mounts"], f"{key}: the token file is not uploaded"
    types = launcher["available_node_types"]
    assert types[launcher["head_node_type"]]["resources"].get("CPU") == 0
    [gpu] = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu["min_workers"] == 0 < gpu["max_workers"]


def test_local_cluster_script_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(CLUSTER / "local_cluster.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------------- commands


def command_texts() -> list[str]:
    """Shell text that may hold commands: YAML string values, README code blocks, example comment lines."""
    texts = [node for _, doc in DOCS for node in walk(doc) if isinstance(node, str)]
    for path in YAML_FILES:
        texts += re.findall(r"^#\s{3,}(.+)$", path.read_text(encoding="utf-8"), re.MULTILINE)
    texts += re.findall(r"^```[^\n]*\n(.*?)^```", (CLUSTER / "README.md").read_text(), re.MULTILINE | re.DOTALL)
    return texts


COMMAND = re.compile(r"(?<![\w./@'\"-])orchestrator[ \t]+([a-z][^;&|<>#`\n]*)")
COMMANDS = sorted({m.group(1).strip() for text in command_texts() for m in COMMAND.finditer(text)})
CRON_LINES = sorted({line.strip() for text in command_texts() for line in text.splitlines()
                     if re.match(r"\s*([\d*/,-]+\s+){5}[a-zA-Z]", line)})


def test_commands_are_found():
    """Guards the extraction itself: a regex that matched nothing would pass every test below."""
    assert {argv.split()[0] for argv in COMMANDS} >= {"train", "tune", "submit"}
    assert any("--command retrain" in argv for argv in COMMANDS) and CRON_LINES


@pytest.mark.parametrize("argv", COMMANDS)
def test_every_command_parses_and_names_a_valid_job(argv, monkeypatch):
    monkeypatch.chdir(REPO)  # job paths are relative to the repository root (/app in the image)
    try:
        args = build_parser().parse_args(shlex.split(argv))
    except SystemExit:
        pytest.fail(f"`orchestrator {argv}` does not parse")
    if getattr(args, "job", None):
        assert Path(args.job).is_file(), f"`orchestrator {argv}`: {args.job} does not exist"
        load_spec(args.job, getattr(args, "overrides", None) or ())


@pytest.mark.parametrize("schedule", [doc["spec"]["schedule"] for _, doc in of_kind("CronJob")] + CRON_LINES)
def test_cron_schedules_are_valid(schedule):
    fields = schedule.split()[:5]
    assert len(fields) == 5
    for field, (low, high) in zip(fields, CRON_RANGES):
        for part in field.split(","):
            base, _, step = part.partition("/")
            assert not step or step.isdigit(), schedule
            if base != "*":
                bounds = [int(n) for n in base.split("-")]
                assert len(bounds) <= 2 and all(low <= n <= high for n in bounds), schedule
