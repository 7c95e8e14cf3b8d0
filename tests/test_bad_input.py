"""Bad input gets one clear message naming the field and the fix, before Ray starts, and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.cli import EXIT_BAD_INPUT, main
from tests.tiny import write_job


def _write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def bad_cases(tmp: Path, data: Path) -> dict[str, tuple[dict, str]]:
    """name -> (job sections to change, text the message must contain)."""
    rows = [{"text": "my invoice", "label": "billing"}, {"text": "my parcel", "label": "shipping"}]
    return {
        "missing model path": ({"model": {"path": str(tmp / "nope")}}, "model.path: " + str(tmp / "nope")),
        "model folder without config": ({"model": {"path": str(tmp)}}, "has no config.json"),
        "model package not installed": ({"model": {"path": "pkg:no_such_pkg/model"}}, "package 'no_such_pkg'"),
        "unknown target module": ({"lora": {"target_modules": ["q_proj"]}},
                                  "lora.target_modules: 'q_proj' matches no linear layer"),
        "missing text column": ({"data": {"text_column": "utterance"}},
                                "data.text_column: column 'utterance' is not in"),
        "missing label column": ({"data": {"label_column": "intent"}}, "data.label_column: column 'intent'"),
        "empty data set": ({"data": {"train": _write_rows(tmp / "empty.jsonl", [])}}, "data.train: "),
        "missing data file": ({"data": {"train": str(tmp / "absent.jsonl")}}, "data.train: "),
        "unseen validation label": (
            {"data": {"validation": _write_rows(tmp / "val.jsonl", [{"text": "a", "label": "refunds"}])}},
            "data.validation: labels ['refunds']"),
        "empty text": ({"data": {"train": _write_rows(tmp / "blank.jsonl", [*rows, {"text": " ", "label": "x"}])}},
                       "row 3 of"),
        "single label": ({"data": {"train": _write_rows(tmp / "one.jsonl", rows[:1] * 4)}}, "needs two or more"),
        "rank zero": ({"lora": {"r": 0}}, "lora.r: Input should be greater than 0"),
        "unknown format": ({"data": {"train": _write_rows(tmp / "train.txt", rows)}}, "unknown format"),
        "missing deepspeed json": ({"deepspeed": {"config": str(tmp / "ds.json")}}, "deepspeed.config: "),
    }


@pytest.mark.parametrize("command", ["validate", "train"])
def test_each_bad_input_is_refused_before_ray_with_nothing_written(tmp_path, job, tiny_data, capsys, command):
    import ray

    for name, (sections, expected) in bad_cases(tmp_path, tiny_data).items():
        raw = job(**sections)
        path = write_job(tmp_path / f"{name.replace(' ', '_')}.yaml", raw)
        assert main([command, str(path)]) == EXIT_BAD_INPUT, name
        message = capsys.readouterr().err
        assert message.startswith("error: ") and expected in message, (name, message)
        assert message.count("\n") <= 2, (name, message)  # one message, not a traceback
        assert not Path(raw["output_dir"]).exists(), name
    assert not ray.is_initialized()


def test_unreachable_tracking_server_fails_fast_before_any_worker(tmp_path, job, capsys):
    import time

    import ray

    raw = job(tracking={"uri": "http://127.0.0.1:9"})  # the discard port: nothing listens
    started = time.monotonic()
    assert main(["train", str(write_job(tmp_path / "job.yaml", raw))]) == EXIT_BAD_INPUT
    assert time.monotonic() - started < 60
    assert "tracking.uri: cannot reach the MLflow tracking store at http://127.0.0.1:9" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_a_tracking_server_slow_to_answer_its_first_request_is_reachable(tmp_path, job):
    """A server that takes the connection but answers its first request in 8 s (a restarted mlflow server on a
    busy machine took over 5 s) is reachable; preflight used to call it unreachable after 5 s."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from orchestrator.spec import spec_from_dict
    from orchestrator.tracking.runs import check_reachable

    class Slow(BaseHTTPRequestHandler):
        def _answer(self):
            time.sleep(8)
            body = b'{"experiments": []}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        spec = spec_from_dict(job(tracking={"uri": uri}))
        started = time.monotonic()
        assert check_reachable(spec) == uri
        assert 8 <= time.monotonic() - started < 30
    finally:
        server.shutdown()


def test_validate_reports_the_plan(tmp_path, job, capsys):
    path = write_job(tmp_path / "job.yaml", job())
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "192 train / 64 validation / 64 test examples, 4 labels" in out and "global batch 32" in out
