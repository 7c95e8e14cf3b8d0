"""Issue 8, point 6: credentials never reach an output or the tracking store; remote code runs only when the
spec asks, with a warning; weights load from safetensors only; checkpoints unpickle as data only; a registry
pull writes only inside its target folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.spec import spec_from_dict
from orchestrator.train.loop import train_worker
from orchestrator.train.session import LocalContext
from tests.tiny import write_job

SECRET = "s3cr3t-7f1c9a42-do-not-log"


def test_a_secret_in_the_environment_appears_in_no_output_and_not_in_the_store(job, tmp_path, monkeypatch):
    from orchestrator.tracking import runs as tracking
    from orchestrator.train.tasks import load_data
    from orchestrator.workflows.training import data_inputs

    for name in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"):
        monkeypatch.setenv(name, SECRET)
    spec = spec_from_dict(job(scaling={"num_workers": 1}, train={"epochs": 1}))
    uri, run_id = tracking.start_run(spec, data_inputs(load_data(spec)))
    train_worker(spec, LocalContext(str(tmp_path / "ckpt")), uri, run_id)
    tracking.end_run(uri, run_id, "FINISHED")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "adapter_config.json" for p in files)
    leaked = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked


def test_remote_code_is_off_by_default_and_warned_about_when_on(job, tmp_path, capsys):
    assert spec_from_dict(job()).model.trust_remote_code is False
    raw = job()
    raw["model"]["trust_remote_code"] = True
    assert main(["validate", str(write_job(tmp_path / "job.yaml", raw))]) == 0
    err = capsys.readouterr().err
    assert "warning: model.trust_remote_code is on" in err


def test_every_weight_load_asks_for_safetensors():
    """A source check: each from_pretrained of a model in the package passes use_safetensors=True (or loads a
    GGUF file, which holds no pickle), and torch.load is called only with weights_only=True."""
    import ast

    for path in Path(__file__).resolve().parents[1].joinpath("orchestrator").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = ast.unparse(node.func.value)
                if node.func.attr == "load" and owner == "torch":
                    keywords = {k.arg: ast.unparse(k.value) for k in node.keywords if k.arg}
                    assert keywords.get("weights_only") == "True", f"{path.name}:{node.lineno}: torch.load"
                if node.func.attr == "from_pretrained" and owner.startswith("AutoModel"):
                    keywords = {k.arg: ast.unparse(k.value) for k in node.keywords if k.arg}
                    options = any(k.arg is None for k in node.keywords)  # **options carries it
                    assert keywords.get("use_safetensors") == "True" or "gguf_file" in keywords or options, \
                        f"{path.name}:{node.lineno}: {ast.unparse(node)[:120]}"


class _HostileRegistry:
    """A loopback HTTP server speaking just enough of MLflow's REST API to serve one version whose artifact
    listing names a file outside the download folder (a compromised or malicious tracking server). A fake by
    design: a real `mlflow server` refuses to store such a path."""

    ROOT = "0/run/artifacts/adapter"

    def __init__(self, listed: str):
        import http.server
        import threading

        version = {"name": "evil", "version": "1", "status": "READY", "run_id": "run",
                   "source": f"mlflow-artifacts:/{self.ROOT}"}
        routes = {
            "/api/2.0/mlflow/registered-models/search": {"registered_models": []},
            "/api/2.0/mlflow/registered-models/get": {"registered_model": {
                "name": "evil", "aliases": [{"alias": "champion", "version": "1"}]}},
            "/api/2.0/mlflow/model-versions/get": {"model_version": version},
            "/api/2.0/mlflow/model-versions/get-download-uri": {"artifact_uri": f"mlflow-artifacts:/{self.ROOT}"},
            "/api/2.0/mlflow-artifacts/artifacts": {"files": [
                {"path": "adapter_config.json", "is_dir": False, "file_size": 2},
                {"path": listed, "is_dir": False, "file_size": 6}]},
        }

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                import json

                path = self.path.split("?")[0]
                body = json.dumps(routes[path]).encode() if path in routes else b"pwned\n"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()


def test_pulling_from_a_hostile_registry_writes_nothing_outside_the_target_folder(tmp_path, capsys):
    for listed in ("../../escape.txt", "/tmp/escape-absolute.txt", "sub/../../escape.txt"):
        server = _HostileRegistry(listed)
        work = tmp_path / listed.replace("/", "_")
        work.mkdir()
        try:
            code = main(["registry", "pull", "evil@champion", "--to", str(work / "pulled"),
                         "--tracking-uri", server.uri])
        finally:
            server.close()
        err = capsys.readouterr().err
        assert code != 0 and "refused" in err and "nothing was written" in err, err
        assert list(work.iterdir()) == [], list(work.rglob("*"))  # no target, no staging folder left
        assert not list(tmp_path.rglob("escape*")) and not Path("/tmp/escape-absolute.txt").exists()


class _Planted:
    """What an attacker with write access to the checkpoint storage would plant: unpickling runs a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("zero_stage,precision,offload", [(0, "fp32", False), (1, "fp32", False),
                                                          (2, "bf16", True), (3, "bf16", False)])
def test_resume_unpickles_checkpoints_as_data_only(job, tmp_path, zero_stage, precision, offload):
    import torch

    def spec(steps):
        return spec_from_dict(job(scaling={"num_workers": 1}, deepspeed={"zero_stage": zero_stage,
                                                                         "offload_optimizer": offload},
                                  train={"epochs": None, "max_steps": steps, "checkpoint_every_steps": 2,
                                         "precision": precision}))

    ckpt = tmp_path / "ckpt"
    train_worker(spec(4), LocalContext(str(ckpt)), None, None)
    events: list[dict] = []
    train_worker(spec(6), LocalContext(str(ckpt), on_progress=events.append), None, None)  # weights_only=True
    assert [e["step"] for e in events if e.get("event") == "start"] == [4]
    if zero_stage != 2:
        return
    marker = tmp_path / "planted-code-ran"
    states = next(ckpt.glob("step_0000006/state/mp_rank_00_model_states.pt"))
    torch.save({"module": _Planted(marker)}, states)
    with pytest.raises(Exception, match="Unsupported global|weights_only"):
        train_worker(spec(8), LocalContext(str(ckpt)), None, None)
    assert not marker.exists()
