"""What each Ray Train run (every search trial is one) costs before its first step: which processes it starts,
what they import, and the workers' import warm-up. A trial's fixed start-up is its orchestration overhead."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from orchestrator.runtime import shortcuts
from orchestrator.spec import spec_from_dict
from orchestrator.train import warmup
from tests.tiny import tiny_job


def test_an_embedded_store_adds_its_sql_module_to_the_warm_up_and_a_server_does_not():
    sql = "mlflow.store.tracking.sqlalchemy_store"
    assert sql in warmup.modules_for("sqlite:////tmp/x/mlflow.db")
    assert sql not in warmup.modules_for("http://127.0.0.1:5000")
    assert sql not in warmup.modules_for(None)
    assert set(warmup.MODULES) <= set(warmup.modules_for("http://127.0.0.1:5000"))


def test_the_warm_up_imports_every_module_it_can_and_skips_one_that_fails(monkeypatch):
    for name in ("colorsys", "wave"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setenv(warmup.ENV, "colorsys,orchestrator_no_such_module,wave")
    monkeypatch.setattr(warmup, "_thread", None)
    warmup.start()
    warmup.wait()
    assert "colorsys" in sys.modules and "wave" in sys.modules


def test_building_a_trainer_and_its_torch_backend_does_not_import_torch(tmp_path, tiny_model, tiny_data):
    """A search trial's driver builds the trainer and Ray Train's controller runs the backend's ``on_start``
    side: neither needs torch, whose import costs seconds of CPU per trial on a small machine."""
    spec = spec_from_dict(tiny_job(tmp_path, tiny_model, tiny_data))
    code = textwrap.dedent(f"""
        import sys
        from orchestrator.runtime.launcher import make_trainer
        from orchestrator.runtime.shortcuts import TorchProcessGroup
        from orchestrator.spec import JobSpec
        spec = JobSpec.model_validate_json({spec.model_dump_json()!r})
        trainer = make_trainer(spec, {{"spec": spec.model_dump(), "progress": None, "tracking_uri": None,
                                       "run_id": None}}, "probe", False, fast=True)
        config = trainer.backend_config
        assert isinstance(config, TorchProcessGroup) and config.backend == "gloo", config
        config.backend_cls(), config.framework, config.train_func_context
        print("torch" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.integration
def test_ray_starts_each_train_worker_already_importing_the_training_stack(ray_cluster, tmp_path, tiny_model,
                                                                          tiny_data):
    """The workers' runtime environment makes Ray run the warm-up as the process's setup hook, before the
    process hosts anything: by the time the training function runs, its imports are done or under way."""
    import ray

    from orchestrator.runtime.launcher import make_trainer

    spec = spec_from_dict(tiny_job(tmp_path, tiny_model, tiny_data))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    trainer = make_trainer(spec, {"spec": spec.model_dump(), "progress": None, "tracking_uri": uri, "run_id": None},
                           "probe", False, fast=True)

    @ray.remote(num_cpus=0, runtime_env=trainer.run_config.worker_runtime_env)
    class Worker:
        def warmed(self):
            from orchestrator.train import warmup as here

            started = here._thread is not None
            here.wait()
            return started, [name for name in here.modules_for(uri) if name not in sys.modules]

    worker = Worker.remote()
    try:
        started, missing = ray.get(worker.warmed.remote(), timeout=180)
    finally:
        ray.kill(worker)
    assert started
    assert missing == []


@pytest.mark.integration
def test_a_training_run_starts_no_process_it_does_not_need_and_leaves_none_behind(ray_cluster, tmp_path, tiny_model,
                                                                                  tiny_data):
    """Ray Train starts, per run, a Ray Data manager and a node-drain watcher unless told otherwise; our runs
    use neither, and a search pays for each process once per trial."""
    from ray.util.state import list_actors

    from tests.test_integration import _train_quietly

    spec = spec_from_dict(tiny_job(tmp_path, tiny_model, tiny_data, scaling={"num_workers": 1},
                                   train={"epochs": 1}, data={"test": None}))
    before = {actor.actor_id for actor in list_actors(limit=10_000)}
    handler = signal.getsignal(signal.SIGINT)
    _train_quietly(spec)
    started = {actor.class_name for actor in list_actors(limit=10_000) if actor.actor_id not in before}
    assert {"TrainController", "RayTrainWorker"} <= started
    if shortcuts.enabled():
        assert not started & {"DatasetManager", "PreemptionWatcher"}, started
    else:  # ORCHESTRATOR_STOCK_RAY=1 (CI runs this test both ways): Ray Train's own per-run processes
        assert "DatasetManager" in started, started

    # Ray Train's Ctrl-C handler holds the run's controller; restored after the run, it lets the controller go
    # (a long-lived driver, a notebook or this test session, kept one controller process per run).
    assert signal.getsignal(signal.SIGINT) is handler
    deadline = time.monotonic() + 30
    while True:
        alive = [actor.actor_id for actor in list_actors(filters=[("class_name", "=", "TrainController")])
                 if actor.actor_id not in before and actor.state != "DEAD"]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not alive, "the finished run's Ray Train controller is still alive"


def test_a_dead_worker_is_named_before_the_errors_it_caused_in_the_others():
    """Kill one worker mid-step and the survivors fail in their collective; Ray lists both failures in no fixed
    order, and the message must name the death (seen: the gloo error reported instead, one run in two)."""
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
    from ray.train.v2.api.exceptions import WorkerGroupError

    from orchestrator.runtime.launcher import worker_error

    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:19678: Connection reset by peer")
    died = WorkerHealthCheckFailedError("A worker health check failed.",
                                        RuntimeError("The actor is dead because its worker process has died."))
    for failures in ({0: gloo, 1: died}, {0: died, 1: gloo}):
        error = WorkerGroupError("\n".join(str(f) for f in reversed(failures.values())), failures)
        assert "worker process has died" in worker_error(error)
    assert "Connection reset" in worker_error(WorkerGroupError(str(gloo), {0: gloo}))


@pytest.mark.integration
def test_a_study_watch_removes_the_placement_group_of_a_dead_controller_and_leaves_the_others(ray_cluster):
    """Search trials share one watcher in place of a cleaner process each: a group is removed once its
    controller is dead, never while it lives, and a released one is left to its controller."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from orchestrator.runtime.launcher import start_placement_group_watch

    @ray.remote(num_cpus=0)
    class Controller:
        def actor_id(self):
            return ray.get_runtime_context().get_actor_id()

    def state(group):
        return placement_group_table(group)["state"]

    watch = start_placement_group_watch()
    dying, living, releasing = (Controller.remote() for _ in range(3))
    groups = [placement_group([{"CPU": 0.01}]) for _ in range(3)]
    ray.get([group.ready() for group in groups], timeout=60)
    ids = ray.get([c.actor_id.remote() for c in (dying, living, releasing)])
    for controller_id, group in zip(ids, groups, strict=True):
        ray.get(watch.watch.remote(controller_id, group))
    ray.get(watch.release.remote(ids[2]))
    try:
        ray.kill(dying)
        ray.kill(releasing)
        deadline = time.monotonic() + 10
        while state(groups[0]) != "REMOVED" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert state(groups[0]) == "REMOVED"
        time.sleep(1)  # five more rounds of the watch
        assert state(groups[1]) == "CREATED" and state(groups[2]) == "CREATED"
        assert ray.get(watch.watched.remote()) == [ids[1]]
    finally:
        for group in groups[1:]:
            remove_placement_group(group)
        ray.kill(living)
        ray.kill(watch)


def test_a_watched_trial_trainer_starts_no_placement_group_cleaner_of_its_own(tmp_path, tiny_model, tiny_data):
    """The trainer swaps Ray Train's per-run cleaner for the study's watch, and keeps it for a run not watched."""
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from orchestrator.runtime.launcher import make_trainer
    from orchestrator.runtime.shortcuts import watched_by

    spec = spec_from_dict(tiny_job(tmp_path, tiny_model, tiny_data))
    config = {"spec": spec.model_dump(), "progress": None, "tracking_uri": None, "run_id": None}

    def cleaners(callbacks):
        trainer = make_trainer(spec, config, "run", verbose=False, callbacks=callbacks, fast=True)
        return [type(c).__name__ for c in trainer._create_default_callbacks()
                if isinstance(c, PlacementGroupCleanerCallback) or getattr(c, "replaces_placement_group_cleaner", 0)]

    assert cleaners([]) == ["PlacementGroupCleanerCallback"]
    assert cleaners([watched_by(watch=None)]) == ["Watched"]


@pytest.mark.integration
def test_a_trial_goes_on_when_the_study_watch_is_gone(ray_cluster, caplog):
    """Registering with the watch is a guard, not a step of training: a watch that died costs a warning."""
    from types import SimpleNamespace

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from orchestrator.runtime.launcher import start_placement_group_watch
    from orchestrator.runtime.shortcuts import watched_by

    watch = start_placement_group_watch()
    ray.kill(watch)
    group = placement_group([{"CPU": 0.01}])
    # Ray 2.60 keeps a group's CPUs reserved for good when it is removed before it was created (measured: 20
    # removed at once left 0.01-0.03 CPU reserved for the rest of the session); later tests count free CPUs.
    ray.get(group.ready(), timeout=60)
    handle = SimpleNamespace(placement_group=group)
    worker_group = SimpleNamespace(get_worker_group_state=lambda: SimpleNamespace(placement_group_handle=handle))
    callback = watched_by(watch)
    callback.controller_id = "0" * 32
    try:
        callback.after_worker_group_start(worker_group)
    finally:
        remove_placement_group(group)
    assert "is not watched" in caplog.text


def test_the_shortcuts_are_used_only_on_the_ray_version_they_were_run_on_and_not_when_told_so():
    assert shortcuts.enabled("2.60.0", {}) and shortcuts.enabled("2.60.3", {})
    assert not any(shortcuts.enabled(version, {}) for version in ("2.61.0", "2.6.0", "2.59.2", "3.0.0"))
    assert not shortcuts.enabled("2.60.0", {shortcuts.STOCK_ENV: "1"})
    assert shortcuts.enabled("2.60.0", {shortcuts.STOCK_ENV: "0"})


def test_the_stock_path_is_rays_torch_trainer_with_its_own_config_cleaner_and_no_warm_up(tmp_path, tiny_model,
                                                                                        tiny_data, monkeypatch):
    """With ``ORCHESTRATOR_STOCK_RAY=1`` (or another Ray version) no Ray internal is used: Ray's TorchTrainer and
    TorchConfig, Ray Train's default callbacks all kept, no setup hook in the workers' environment."""
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from orchestrator.runtime.launcher import make_trainer

    monkeypatch.setenv(shortcuts.STOCK_ENV, "1")
    spec = spec_from_dict(tiny_job(tmp_path, tiny_model, tiny_data))
    config = {"spec": spec.model_dump(), "progress": None, "tracking_uri": None, "run_id": None}
    stock = make_trainer(spec, config, "run", verbose=False)
    assert type(stock) is TorchTrainer
    assert type(stock.backend_config) is TorchConfig and stock.backend_config.backend == "gloo"
    kinds = {type(c) for c in stock._create_default_callbacks()}
    assert {DatasetsCallback, PlacementGroupCleanerCallback} <= kinds
    assert warmup.ENV not in stock.run_config.worker_runtime_env["env_vars"]

    monkeypatch.delenv(shortcuts.STOCK_ENV)
    fast = make_trainer(spec, config, "run", verbose=False)  # Ray 2.60, as pinned: the shortcuts
    assert isinstance(fast.backend_config, shortcuts.TorchProcessGroup)
    assert DatasetsCallback not in {type(c) for c in fast._create_default_callbacks()}
    assert warmup.ENV in fast.run_config.worker_runtime_env["env_vars"]
