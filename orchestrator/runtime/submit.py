"""``orchestrator submit``: runs any orchestrator command on a remote Ray cluster through the Ray Jobs API.

The current folder (the job file and the data it names, minus virtualenvs, outputs and what .gitignore
excludes) travels as the job's ``working_dir`` and this copy of the ``orchestrator`` package as a ``py_module``,
so the cluster runs exactly the code and spec you have. Logs stream back; the exit code is the remote command's.

Ray's token (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token) is read by Ray's client from the
environment; MLflow credentials are never sent (the cluster must hold them, e.g. in a Kubernetes Secret).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from orchestrator.runtime.launcher import IN_RAY_JOB
from orchestrator.spec import SpecError, load_spec

COMMANDS = ("train", "tune", "retrain", "validate")
EXCLUDES = [".venv", "venv", ".git", "runs", "mlruns", "mlartifacts", ".ray-local", "**/__pycache__", "*.db",
            ".pytest_cache", ".ruff_cache", "*.egg-info"]
AGENT_WAIT_S = 60  # how long a freshly started head may take to bring up its job agent
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")  # never credentials


def entrypoint(command: str, job: str, overrides: list[str], extra: list[str]) -> str:
    return shlex.join(["python", "-m", "orchestrator", command, job, *overrides, *extra])


def runtime_env(working_dir: str) -> dict:
    import orchestrator

    env = {key: os.environ[key] for key in FORWARDED_ENV if os.environ.get(key)}
    if urlsplit(env.get("MLFLOW_TRACKING_URI", "")).username:
        raise SpecError("MLFLOW_TRACKING_URI holds credentials; move them to MLFLOW_TRACKING_USERNAME/PASSWORD "
                        "(or MLFLOW_TRACKING_TOKEN) on the cluster: submit never sends credentials")
    return {"working_dir": working_dir, "py_modules": [str(Path(orchestrator.__file__).parent)],
            "excludes": EXCLUDES, "env_vars": {**env, "PYTHONUNBUFFERED": "1", IN_RAY_JOB: "1"}}


def submit(job_file: str, overrides: list[str], address: str, command: str = "train", wait: bool = True,
           extra: list[str] | None = None) -> int:
    """Submits ``orchestrator COMMAND JOB`` to the cluster at ``address`` (http://HEAD:8265); returns the remote
    command's exit code (0 when not waiting).

    Raises:
        SpecError: the job file is invalid or outside the current folder, or the cluster cannot be reached.
    """
    load_spec(job_file, overrides)  # a bad spec fails here, not after an upload
    _check_output_dir(job_file, overrides)
    here, job = Path.cwd().resolve(), Path(job_file).resolve()
    if not job.is_relative_to(here):
        raise SpecError(f"{job_file}: submit uploads the current folder ({here}) as the job's working directory; "
                        "run it from a folder that holds the job file and its data")
    environment = runtime_env(str(here))  # refuses credentials before the cluster is contacted
    client = _client(address)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint(command, str(job.relative_to(here)), overrides,
                                                             extra or []),
                                       runtime_env=environment,
                                       metadata={"orchestrator.command": command, "orchestrator.job": job.name})
            break
        except Exception as error:  # package too large, runtime env rejected, auth refused, ...
            if "No available agent" in str(error) and time.monotonic() < deadline:
                time.sleep(2)  # a cluster that just started: its job agents are not up yet
                continue
            raise SpecError(f"--address {address}: the cluster refused the job: {str(error)[:500]}") from None
    print(f"submitted {job_id} to {address}: orchestrator {command} {job.relative_to(here)}", flush=True)
    if not wait:
        print(f"follow it with: ray job logs --address {address} --follow {job_id}")
        return 0
    try:
        asyncio.run(_stream(client, job_id))
    except KeyboardInterrupt:
        client.stop_job(job_id)
        print(f"\nstopped {job_id}", file=sys.stderr)
        return 130
    return _exit_code(client.get_job_info(job_id))


def _check_output_dir(job_file: str, overrides: list[str]) -> None:
    """On the cluster the job runs inside a temporary copy of the current folder: a relative output_dir (and
    the embedded MLflow store under it) would vanish with that copy."""
    import yaml

    given = next((o.partition("=")[2] for o in reversed(overrides) if o.startswith("output_dir=")), None)
    given = given or (yaml.safe_load(Path(job_file).read_text(encoding="utf-8")) or {}).get("output_dir", "")
    if not Path(str(given)).is_absolute() and "://" not in str(given):
        raise SpecError(f"output_dir: '{given}' is relative; on the cluster it would land in the job's temporary "
                        "working directory and be deleted with it. Point it at storage every node shares, e.g. "
                        "add output_dir=/mnt/shared/runs/NAME")


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as error:  # ConnectionError, auth errors, a non-Ray URL
        message = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
        hint = ("; the cluster wants Ray's token: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=<token file>"
                if "auth" in message.lower() or "401" in message or "403" in message else
                "; is the head's dashboard (job API, port 8265) running and reachable (kubectl port-forward)?")
        raise SpecError(f"--address {address}: cannot reach the Ray job API ({message}){hint}") from None


async def _stream(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def _exit_code(info) -> int:
    code = getattr(info, "driver_exit_code", None)
    if code is not None:
        return int(code)
    status = str(info.status)
    if status.endswith("SUCCEEDED"):
        return 0
    print(f"job ended {status}: {info.message or ''}", file=sys.stderr)
    return 130 if status.endswith("STOPPED") else 1
