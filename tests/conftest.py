from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.tiny import tiny_job, tiny_lm_job, write_tiny_data, write_tiny_llama, write_tiny_lm_data, write_tiny_model

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")  # the GPU check: CUDA
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests choose their own stores
os.environ.pop("RAY_ADDRESS", None)

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
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
    from tests.tiny import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster (2 CPUs) for the integration tests; its address for subprocess drivers."""
    import ray

    from orchestrator.runtime.launcher import connect

    connect()
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
