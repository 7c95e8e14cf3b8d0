"""Issue 8, point 6 (in progress): credentials never reach an output or the tracking store; remote code runs
only when the spec asks, with a warning; weights load from safetensors only."""

from __future__ import annotations

from pathlib import Path

from orchestrator.cli import main
from orchestrator.session import LocalContext
from orchestrator.spec import spec_from_dict
from orchestrator.train_loop import train_worker
from tests.tiny import write_job

SECRET = "s3cr3t-7f1c9a42-do-not-log"


def test_a_secret_in_the_environment_appears_in_no_output_and_not_in_the_store(job, tmp_path, monkeypatch):
    from orchestrator import tracking
    from orchestrator.tasks import load_data
    from orchestrator.training import data_inputs

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
    GGUF file, which holds no pickle), and nothing calls torch.load."""
    import ast

    for path in Path(__file__).resolve().parents[1].joinpath("orchestrator").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = ast.unparse(node.func.value)
                if node.func.attr == "load" and owner == "torch":
                    raise AssertionError(f"{path.name}:{node.lineno}: torch.load")
                if node.func.attr == "from_pretrained" and owner.startswith("AutoModel"):
                    keywords = {k.arg: ast.unparse(k.value) for k in node.keywords if k.arg}
                    options = any(k.arg is None for k in node.keywords)  # **options carries it
                    assert keywords.get("use_safetensors") == "True" or "gguf_file" in keywords or options, \
                        f"{path.name}:{node.lineno}: {ast.unparse(node)[:120]}"
