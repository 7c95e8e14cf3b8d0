from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny import tiny_job, tiny_lm_job, write_tiny_data, write_tiny_llama, write_tiny_lm_data, write_tiny_model

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests choose their own stores
os.environ.pop("RAY_ADDRESS", None)

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture
def job(tmp_path, tiny_model, tiny_data):
    """A factory of tiny job dicts under this test's tmp_path: job(lora={"r": 2}, ...)."""
    return lambda **sections: tiny_job(tmp_path, tiny_model, tiny_data, **sections)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny_chats(tmp_path_factory) -> Path:
    return write_tiny_lm_data(tmp_path_factory.mktemp("tiny") / "chats")


@pytest.fixture
def lm_job(tmp_path, tiny_llama, tiny_chats):
    """A factory of tiny causal LM job dicts (chat data) under this test's tmp_path."""
    return lambda **sections: tiny_lm_job(tmp_path, tiny_llama, tiny_chats, **sections)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process (SQLite backend, local artifact root) on a loopback port."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
               "--workers", "1"]
    log = open(root / "server.log", "wb")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError as error:
            if server.poll() is not None or time.monotonic() > deadline:
                log_text = (root / "server.log").read_text()[-2000:]
                raise RuntimeError(f"mlflow server did not start: {log_text}") from error
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster (2 CPUs) for the integration tests; its address for subprocess drivers."""
    import ray

    from orchestrator.launcher import connect

    connect()
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
