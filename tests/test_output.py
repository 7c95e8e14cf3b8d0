"""Output that reads well without a terminal: timestamped plain or JSON lines, rate-limited training progress, one
line per trial event, Ray's own messages stripped of ANSI codes and shown once; rich stays on a terminal."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from orchestrator.cli import build_parser, main
from orchestrator.workflows import console as consoles
from orchestrator.workflows.console import StudyConsole, TrainingConsole, TrialBoard
from orchestrator.workflows.log_lines import LineWriter, Notices, PlainStudyConsole, PlainTrainingConsole, strip_ansi
from tests.tiny import write_job

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ")
RAYLET = ("\x1b[33m(raylet)\x1b[0m A worker died or was killed while executing a task by an unexpected system "
          "error. To troubleshoot the problem, check the logs for the dead worker. RayTask ID: {0}\n"
          "Worker ID: {0}  Worker PID: {1}  Worker exit type: SYSTEM_ERROR")


class FakeClock:
    def __init__(self, start: float = 0.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def default_choice():
    yield
    consoles.configure()  # main() and the tests below change the module's choice


def start_event(step=0, total=100):
    return {"event": "start", "step": step, "total": total, "trainable": 1000, "total_params": 100_000,
            "computes": "fp32 on cpu"}


def step_event(step, total=100, loss=0.5):
    return {"event": "step", "step": step, "total": total, "train_loss": loss, "samples_per_s": 40.0}


def run_training_events(every: float, fmt: str = "plain"):
    """Steps 1..100 at one per second of a fake clock, an evaluation every 25; the written lines."""
    out, clock = io.StringIO(), FakeClock()
    wall = FakeClock(1_796_137_445.0)  # 2026-12-01T15:04:05Z
    plain = PlainTrainingConsole(LineWriter(fmt, out, wall), progress_every_s=every, clock=clock)
    with plain:
        plain(start_event())
        for step in range(1, 101):
            clock.now, wall.now = step, 1_796_137_445.0 + step
            plain(step_event(step, loss=1 / step))
            if step % 25 == 0:
                plain({"event": "eval", "step": step, "total": 100, "eval_loss": 0.3, "eval_accuracy": 0.9,
                       "eval_macro_f1": 0.85})
        plain({"event": "warning", "text": "MLflow is unreachable; training goes on"})
        plain({"event": "done", "adapter": "/out/adapter", "eval_accuracy": 0.9, "test_accuracy": 0.88})
    return out.getvalue().splitlines()


def test_plain_training_lines_are_timestamped_and_steps_come_at_most_every_interval():
    lines = run_training_events(every=30)
    assert all(STAMP.match(line) for line in lines), lines
    assert lines[0] == ("2026-12-01T15:04:05Z train start: 100 steps, 1,000 of 100,000 parameters trained (1.00%); "
                        "fp32 on cpu")
    steps = [line for line in lines if " train step " in line]
    numbers = [int(re.search(r"train step (\d+)/100", line).group(1)) for line in steps]
    assert numbers == [30, 60, 90, 100]  # one per 30 s of the fake clock, and the last step always
    assert steps[0] == "2026-12-01T15:04:35Z train step 30/100  loss 0.0333  40 samples/s  ETA 1m10s"
    evals = [line for line in lines if " eval step " in line]
    assert [int(re.search(r"eval step (\d+)/", e).group(1)) for e in evals] == [25, 50, 75, 100]
    assert "accuracy 0.9000" in evals[0] and "macro_f1 0.8500" in evals[0]
    assert lines[-2].endswith("warning: MLflow is unreachable; training goes on")
    assert "train done: adapter /out/adapter" in lines[-1] and "test_accuracy 0.8800" in lines[-1]


def test_progress_every_zero_logs_every_step_event():
    lines = run_training_events(every=0)
    assert len([line for line in lines if " train step " in line]) == 100


def test_json_lines_parse_and_carry_the_events_fields():
    records = [json.loads(line) for line in run_training_events(every=30, fmt="json")]
    assert [r["event"] for r in records][:3] == ["start", "eval", "step"]
    assert all(r["ts"].endswith("Z") for r in records)
    step = records[2]
    assert {k: step[k] for k in ("step", "total", "samples_per_s", "eta_s")} == {
        "step": 30, "total": 100, "samples_per_s": 40.0, "eta_s": 70}
    assert step["loss"] == pytest.approx(1 / 30, abs=1e-6)
    evaluation = next(r for r in records if r["event"] == "eval")
    assert evaluation["eval_accuracy"] == 0.9 and evaluation["step"] == 25
    assert records[-1]["event"] == "end" and records[-1]["status"] == "finished"


def test_a_commands_own_loop_reports_rows_at_most_every_interval_and_at_the_end():
    from orchestrator.workflows.log_lines import PlainCounter

    out, clock = io.StringIO(), FakeClock()
    rows = PlainCounter(LineWriter("plain", out, FakeClock(1_796_137_445.0)), "eval", progress_every_s=30, clock=clock)
    rows.start(1000)
    for second in range(1, 101):  # 10 rows a second
        clock.now = second
        rows.advance(10)
    lines = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["300/1000", "600/1000", "900/1000", "1000/1000"]
    assert lines[0].endswith("eval 300/1000 rows  10 rows/s  ETA 1m10s") and lines[-1].endswith("ETA 0s")


def test_a_restart_from_a_checkpoint_gets_its_own_line():
    out = io.StringIO()
    plain = PlainTrainingConsole(LineWriter("plain", out), clock=FakeClock())
    plain(start_event())
    plain(start_event(step=40))
    assert "workers restarted from the checkpoint at step 40" in out.getvalue().splitlines()[1]


def test_notices_strip_ansi_and_show_each_message_once():
    shown = []
    notices = Notices(lambda source, text: shown.append((source, text)))
    assert notices(RAYLET.format("ab" * 12, 4242))
    assert not notices(RAYLET.format("cd" * 12, 5151))  # the same message for another worker
    assert notices("\x1b[31mTask was killed due to the node running low on memory.\x1b[0m")
    assert len(shown) == 2 and not any("\x1b" in text for _, text in shown)
    assert shown[0][1].startswith("(raylet) A worker died or was killed") and "\n" not in shown[0][1]
    assert strip_ansi("\x1b[1;33mwarn\x1b[0m") == "warn"


def study_events(fmt: str) -> list[str]:
    out = io.StringIO()
    study = PlainStudyConsole(LineWriter(fmt, out, FakeClock(1_796_137_445.0)), TrialBoard("eval_loss", "min"))
    with study:
        study.note("2 trials, 1 at a time")
        study("start", "a_00000", {"lora.r": 2}, {})
        study("result", "a_00000", {"lora.r": 2}, {"eval_loss": 0.9, "step": 4})
        study("result", "a_00000", {"lora.r": 2}, {"eval_loss": 0.7, "step": 8})
        study("complete", "a_00000", {"lora.r": 2}, {"status": "stopped early"})
        study("start", "a_00001", {"lora.r": 4}, {})
        study("error", "a_00001", {"lora.r": 4}, {"error": "RuntimeError: out of memory\n  at line 3"})
        study.mark({"a_00000": "stopped early", "a_00001": "failed"})
    return out.getvalue().splitlines()


def test_plain_study_console_writes_a_line_per_trial_event_then_the_table():
    lines = study_events("plain")
    stamped = [line[len("2026-12-01T15:04:05Z "):] for line in lines if STAMP.match(line)]
    assert stamped == ["study: 2 trials, 1 at a time",
                       "trial a_00000 started: lora.r=2",
                       "trial a_00000 step 4: eval_loss 0.9000 (best 0.9000)",
                       "trial a_00000 step 8: eval_loss 0.7000 (best 0.7000)",
                       "trial a_00000 stopped early at step 8, best eval_loss 0.7000",
                       "trial a_00001 started: lora.r=4",
                       "trial a_00001 failed: RuntimeError: out of memory"]
    table = "\n".join(lines[len(stamped):])
    assert "trials (eval_loss, min)" in table and "a_00001" in table and "stopped early" in table
    assert "\x1b" not in table and "[red]" not in table


def test_json_study_lines_parse_with_trial_config_status_and_error():
    records = [json.loads(line) for line in study_events("json")]
    assert records[1] == {"ts": "2026-12-01T15:04:05Z", "event": "trial_start", "trial": "a_00000",
                          "config": {"lora.r": 2}}
    assert records[2]["eval_loss"] == 0.9 and records[2]["step"] == 4
    ends = [r for r in records if r["event"] == "trial_end"]
    assert [(r["status"], r.get("error")) for r in ends] == [("stopped early", None),
                                                            ("failed", "RuntimeError: out of memory")]
    assert {r["trial"]: r["status"] for r in records if r["event"] == "trial_summary"} == {
        "a_00000": "stopped early", "a_00001": "failed"}


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_the_format_follows_the_real_stream_and_plain_forces_lines_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Stream(tty=True))
    assert consoles.log_format() == "rich" and isinstance(consoles.training_console(), TrainingConsole)
    assert isinstance(consoles.study_console("eval_loss", "min"), StudyConsole)
    consoles.configure("plain", 5)
    assert isinstance(consoles.training_console(), PlainTrainingConsole)
    assert consoles.training_console().every == 5
    consoles.configure("auto")
    monkeypatch.setattr(sys, "stderr", Stream(tty=False))
    assert consoles.log_format() == "plain" and isinstance(consoles.study_console("m", "min"), PlainStudyConsole)
    consoles.configure("json")
    assert consoles.training_console().write.format == "json"


def test_the_cli_sets_the_choice_once_for_the_commands_that_run_long(monkeypatch):
    for command in (["train", "j.yaml"], ["tune", "j.yaml"], ["retrain", "j.yaml"], ["compare", "j.yaml"],
                    ["eval", "--adapter", "a", "--data", "d"]):
        args = build_parser().parse_args([*command, "--log-format", "json", "--progress-every", "5"])
        assert (args.log_format, args.progress_every) == ("json", 5.0)
        assert build_parser().parse_args(command).progress_every == 30.0
    seen = []
    monkeypatch.setattr("orchestrator.cli.training._train", lambda args: seen.append(consoles.log_format()) or 0)
    assert main(["train", "j.yaml", "--log-format", "plain", "--progress-every", "0"]) == 0
    assert seen == ["plain"] and consoles.training_console().every == 0


def test_rays_driver_messages_reach_the_notices_once_without_ansi(capfd):
    """Ray's own printer for the raylet's messages, and its logger, routed while a run is in progress."""
    import logging

    import ray  # noqa: F401 - sets up Ray's logger and its error printer
    from ray._private import worker

    from orchestrator.runtime import launcher, shortcuts

    if not shortcuts.enabled():
        pytest.skip("the routing uses Ray's printer, a shortcut; the stock path is checked below")
    shown = []
    notices = Notices(lambda source, text: shown.append(text))
    with launcher.driver_messages(notices):
        for pid in (4242, 5151):
            worker.print_to_stdstream({"lines": [RAYLET.format(f"{pid:024x}", pid)], "pid": "raylet",
                                       "is_err": False}, ignore_prefix=False)
        logging.getLogger("ray.tune.tune_controller").error("Trial task failed for trial a_1\nTraceback: ...")
    worker.print_to_stdstream({"lines": ["after the run"], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert shown == [strip_ansi(RAYLET.format(f"{4242:024x}", 4242)).replace("\n", " ").replace("  ", " "),
                     "Trial task failed for trial a_1"]
    printed = capfd.readouterr()
    assert "A worker died" not in printed.out + printed.err and "Traceback" not in printed.err
    assert "after the run" in printed.out  # Ray's printer is back once the run is over


def test_on_the_stock_path_ray_prints_its_messages_itself_uncoloured(monkeypatch, capfd):
    from ray._private import worker

    from orchestrator.runtime import launcher

    monkeypatch.setenv("ORCHESTRATOR_STOCK_RAY", "1")
    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    with launcher.driver_messages(Notices(lambda source, text: None)):
        worker.print_to_stdstream({"lines": ["A worker died or was killed"], "pid": "raylet", "is_err": False},
                                  ignore_prefix=False)
    out = capfd.readouterr().out
    assert "A worker died or was killed" in out and "\x1b" not in out


# ----------------------------------------------------------------------------------------- end to end


def read_lines(process: subprocess.Popen) -> list[tuple[float, str]]:
    """Each stderr line of ``process`` with the monotonic time it arrived, until the process ends."""
    arrived = []

    def pump():
        for line in process.stderr:
            arrived.append((time.monotonic(), line.rstrip("\n")))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    process.wait(timeout=400)
    reader.join(timeout=10)
    return arrived


@pytest.mark.integration
def test_a_search_with_piped_stderr_logs_each_trial_event_as_it_happens(ray_cluster, job, tmp_path):
    raw = job(train={"epochs": 1, "eval_every_steps": 4}, scaling={"num_workers": 1},
              tune={"space": {"lora.r": {"grid": [2, 4]}}, "metric": "eval_loss", "scheduler": {"name": "fifo"},
                    "max_concurrent_trials": 1, "register_best": False})
    command = [sys.executable, "-m", "orchestrator", "tune", str(write_job(tmp_path / "job.yaml", raw))]
    driver = subprocess.Popen(command, env={**os.environ, "RAY_ADDRESS": ray_cluster}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = read_lines(driver)
    ended = time.monotonic()
    stdout = driver.stdout.read()
    assert driver.returncode == 0, "\n".join(line for _, line in lines)[-3000:]
    assert stdout.startswith("trials:  2 (2 finished)")
    events = [(t, line) for t, line in lines if re.match(STAMP.pattern + r"trial ", line)]
    assert all("\x1b" not in line for _, line in lines)
    trials = sorted({line.split()[2] for _, line in events})
    assert len(trials) == 2
    first = [(t, line.split(" ", 3)[3]) for t, line in events if line.split()[2] == trials[0]]
    kinds = [text.split(":")[0].split(" ")[0] for _, text in first]
    assert kinds == ["started", "step", "step", "step", "finished"], first
    assert "lora.r=2" in first[0][1]
    # the first trial's lines arrived while the search ran: before the second trial even started, seconds
    # before the driver ended (a console that printed only at the end would give ~0 here)
    second_start = next(t for t, line in events if line.split()[2] == trials[1] and "started" in line)
    assert first[-1][0] < second_start and ended - first[1][0] > 3, (ended - first[1][0])


@pytest.mark.integration
def test_a_training_run_with_piped_stderr_logs_progress_lines_and_json_parses(ray_cluster, job, tmp_path):
    raw = job(train={"epochs": None, "max_steps": 12, "eval_every_steps": 6, "log_every_steps": 2},
              scaling={"num_workers": 1})
    path = write_job(tmp_path / "job.yaml", raw)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    plain = subprocess.run([sys.executable, "-m", "orchestrator", "train", str(path), "--progress-every", "0"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    lines = plain.stderr.splitlines()
    steps = [line for line in lines if " train step " in line]
    assert [int(re.search(r"step (\d+)/12", line).group(1)) for line in steps] == [2, 4, 6, 8, 10, 12]
    assert all(STAMP.match(line) and re.search(r"loss \d\.\d{4}  \d+ samples/s  ETA ", line) for line in steps)
    assert any(" train start: 12 steps" in line for line in lines) and any(" train done: " in line for line in lines)
    assert plain.stdout.startswith("adapter: ")

    again = subprocess.run([sys.executable, "-m", "orchestrator", "train", str(path),
                            f"output_dir={tmp_path / 'again'}", "--log-format", "json"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    records = [json.loads(line) for line in again.stderr.splitlines()]  # every stderr line is one JSON object
    kinds = [r["event"] for r in records]
    assert kinds[0] == "start" and kinds[-1] == "end" and "eval" in kinds
    step = next(r for r in records if r["event"] == "step")
    assert {"ts", "step", "total", "loss", "samples_per_s", "eta_s"} <= set(step)
