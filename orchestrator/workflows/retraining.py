"""``orchestrator retrain``: the unit a schedule runs. A thin driver over the pure gate in
:mod:`orchestrator.plan.promotion`:

snapshot -> (already decided? report it) -> train a challenger -> under the model's promotion lock: evaluate
challenger and champion on the same held-out rows in this process, decide, register, move aliases, record.

Idempotent: the decision is keyed by the snapshot's data digest, so a rerun on the same data registers nothing
and a rerun after a crash finishes what was decided.
"""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from orchestrator.plan.promotion import (
    FIRST,
    KEPT,
    PROMOTED,
    TAG_DECISION,
    TAG_DIGEST,
    TAG_REASON,
    Decision,
    Snapshot,
    decide,
    decision_tags,
    snapshot_job,
)
from orchestrator.spec import JobSpec, SpecError
from orchestrator.train.data import resolve_snapshot


@dataclass(frozen=True)
class RetrainResult:
    snapshot: Snapshot
    decision: Decision
    model: str
    version: str  # the challenger's version
    champion: str | None  # the champion after this retrain
    challenger_value: float | None
    champion_value: float | None
    run_id: str | None  # the decision's MLflow run (None when an earlier retrain decided)
    reused: bool  # True: this snapshot was decided before; nothing was trained or registered


def retrain(spec: JobSpec, verbose: bool = False) -> RetrainResult:
    """Trains a challenger on the newest snapshot and promotes it only past the gate.

    Raises:
        SpecError: bad input (spec, snapshot, model, unreachable tracking store), before any training.
        TrainingFailed / StudyFailed: the challenger's training failed (nothing registered).
    """
    from orchestrator.tracking import registry
    from orchestrator.tracking import runs as tracking
    from orchestrator.workflows.preflight import preflight

    if spec.retrain is None:
        raise SpecError("retrain: this job has no retrain section; add one (see jobs/intent_retrain.yaml)")
    rule, name = spec.retrain, spec.registered_model_name()
    uri = tracking.check_reachable(spec)
    snapshot = resolve_snapshot(rule.data)
    job = snapshot_job(spec, snapshot, uri)
    checked = preflight(job)
    client = registry.connect(uri)
    print(f"snapshot: {snapshot.name} (sha256 {snapshot.digest[:12]}) from {snapshot.folder}", flush=True)
    earlier = _decided(client, name, snapshot.digest)
    if earlier is not None:
        return _finish_earlier(client, spec, snapshot, earlier)

    run_id, adapter = _train_challenger(job, verbose)

    holdout = checked.data.test or checked.data.validation
    alias = spec.registry.champion_alias
    with registry.promotion_lock(client, name, stale_after_s=rule.lock_timeout_s):
        earlier = _decided(client, name, snapshot.digest)  # a racing retrain of this snapshot got here first
        if earlier is not None:
            return _finish_earlier(client, spec, snapshot, earlier, locked=True)
        champion = _champion(client, name, alias)
        challenger_value = _evaluate(adapter, job.model.path, job, holdout, checked.data.label_names)[rule.metric]
        champion_value = None
        if champion is not None:
            folder = Path(job.output_dir, f"champion-v{champion.version}")
            shutil.rmtree(folder, ignore_errors=True)
            registry.pull(client, registry.Ref(name, version=str(champion.version)), str(folder))
            base = (champion.tags or {}).get("base_model") or job.model.path
            champion_value = _evaluate(str(folder), base, job, holdout, checked.data.label_names)[rule.metric]
        champion_version = str(champion.version) if champion is not None else None
        decision = decide(rule, challenger_value, champion_value, champion_version)
        tags = {**decision_tags(snapshot, rule, decision, challenger_value, champion_value, champion_version),
                "base_model": spec.model.path, "orchestrator.job": spec.name,
                "orchestrator.holdout": f"{holdout.name} ({len(holdout)} rows)"}
        # From here to the decision run's tag, a crash is finished by the next run on this snapshot
        # (_finish_earlier): the version's tags hold the decision; DECISION_RUN_TAG, written last, marks it done.
        # All of it under the lock, so a racing retrain of this snapshot never sees it half done.
        version = registry.register_adapter(client, name, run_id, tags)
        registry.move_alias(client, name, spec.registry.challenger_alias, version,
                            f"retrain challenger on snapshot {snapshot.name}")
        if decision.promote:
            registry.move_alias(client, name, alias, version, decision.reason)
        decision_run = _record_decision(client, uri, spec, snapshot, version, run_id, decision, challenger_value,
                                        champion_value, champion_version, holdout.source)
    return RetrainResult(snapshot, decision, name, version, version if decision.promote else champion_version,
                         challenger_value, champion_value, decision_run, reused=False)


DECISION_RUN_TAG = "orchestrator.decision_run_id"


def _record_decision(client, uri: str, spec: JobSpec, snapshot: Snapshot, version: str, run_id: str,
                     decision: Decision, challenger_value: float | None, champion_value: float | None,
                     champion_version: str | None, holdout: str) -> str:
    """The decision's finished MLflow run, then its id on the version: the last write of a retrain."""
    from orchestrator.tracking import runs as tracking

    assert spec.retrain is not None
    rule, name = spec.retrain, spec.registered_model_name()
    metrics = {f"challenger_{rule.metric}": challenger_value, f"champion_{rule.metric}": champion_value}
    decision_run = tracking.log_decision_run(
        uri, spec, f"retrain-{snapshot.name}",
        params={"snapshot": snapshot.name, "data_digest": snapshot.digest, "metric": rule.metric,
                "margin": rule.margin, "minimum": rule.minimum, "holdout": holdout,
                "challenger_version": version, "champion_version": champion_version or "none",
                "challenger_run_id": run_id},
        metrics={k: v for k, v in metrics.items() if v is not None},
        tags={TAG_DECISION: decision.outcome, TAG_REASON: decision.reason, TAG_DIGEST: snapshot.digest,
              "orchestrator.registered_model": name})
    client.set_model_version_tag(name, version, DECISION_RUN_TAG, decision_run)
    return decision_run


def _train_challenger(job: JobSpec, verbose: bool) -> tuple[str, str]:
    """(MLflow run id, adapter folder) of the challenger: one training run, or the best trial of a search."""
    assert job.retrain is not None
    if job.retrain.challenger == "search":
        from orchestrator.runtime.tune_launcher import study_exists
        from orchestrator.workflows.tuning import tune

        study = tune(job, resume=study_exists(job), verbose=verbose)  # a rerun continues the snapshot's study
        return study.best.run_id, str(Path(job.output_dir, "trials", study.best.trial_id, "adapter"))
    from orchestrator.workflows.training import train

    result = train(job, verbose=verbose)
    return result.run_id, result.adapter_dir


def _evaluate(adapter: str, base: str, job: JobSpec, holdout, label_names: list[str] | None) -> dict[str, float]:
    """The gate's metrics of the adapter in ``adapter`` on ``holdout``, read with the retrain job's data settings.

    A classifier loads on ``base`` (the base the version records). A causal LM loads on the base its saved job
    records (path, GGUF file and all; ``base`` is PEFT's fallback for an adapter without one), and generates
    only when the gate compares completions.
    """
    from orchestrator.spec import GENERATION_METRICS

    if job.model.task == "causal_lm":
        from orchestrator.serve.evaluation import evaluate_lm
        from orchestrator.serve.inference import load_causal_adapter, saved_job

        loaded = load_causal_adapter(adapter, None if saved_job(adapter) is not None else base)
        assert job.retrain is not None
        generating = job.retrain.metric in GENERATION_METRICS
        return evaluate_lm(loaded, holdout, job.data, job.generation.max_new_tokens if generating else None)
    from orchestrator.serve.evaluation import evaluate_adapter

    assert label_names is not None
    return evaluate_adapter(adapter, base, holdout, label_names, job.data.max_length)


def _champion(client, name: str, alias: str):
    from orchestrator.tracking import registry

    try:
        model = registry.get_model(client, name)
    except registry.RegistryError:
        return None  # the first retrain of this model
    version = registry.aliases_of(model).get(alias)
    return client.get_model_version(name, version) if version else None


def _decided(client, name: str, digest: str):
    """The version an earlier retrain registered for this data digest, if any."""
    from orchestrator.tracking import registry

    try:
        registry.get_model(client, name)
    except registry.RegistryError:
        return None
    found = [v for v in registry.versions(client, name) if (v.tags or {}).get(TAG_DIGEST) == digest]
    return min(found, key=lambda v: int(v.version)) if found else None


def _finish_earlier(client, spec: JobSpec, snapshot: Snapshot, version, locked: bool = False) -> RetrainResult:
    """Reports an earlier decision on this snapshot, first finishing one that a crash cut short.

    A version without :data:`DECISION_RUN_TAG` was registered by a retrain that died before its last write. Its
    tags hold the decision; under the promotion lock this moves the challenger alias to it (if no newer version
    exists), the champion alias to it when it was promoted and the champion is still the one it beat, and
    records the decision run, so that each step happens once whatever point the crash came at.
    """
    from orchestrator.tracking import registry
    from orchestrator.tracking import runs as tracking

    name, alias, tags = spec.registered_model_name(), spec.registry.champion_alias, version.tags or {}
    number_text = str(version.version)
    outcome = tags.get(TAG_DECISION, KEPT)
    decision = Decision(outcome, outcome in (PROMOTED, FIRST), tags.get(TAG_REASON, ""))

    def number(key: str) -> float | None:
        try:
            return float(tags[key])
        except (KeyError, ValueError):
            return None

    metric = tags.get("orchestrator.metric", "")
    challenger_value, champion_value = number(f"orchestrator.eval.{metric}"), number("orchestrator.champion_value")
    decided_against = tags.get("orchestrator.champion_version") or None
    champion = registry.aliases_of(registry.get_model(client, name)).get(alias)
    if DECISION_RUN_TAG not in tags:
        with nullcontext() if locked else registry.promotion_lock(client, name):
            aliases = registry.aliases_of(registry.get_model(client, name))
            champion = aliases.get(alias)
            newest = max(int(v.version) for v in registry.versions(client, name)) == int(number_text)
            if newest and aliases.get(spec.registry.challenger_alias) != number_text:
                registry.move_alias(client, name, spec.registry.challenger_alias, number_text,
                                    f"retrain challenger on snapshot {snapshot.name}")
            if decision.promote and champion != number_text and champion == decided_against:
                registry.move_alias(client, name, alias, number_text, decision.reason)
                champion = number_text
            _record_decision(client, tracking.tracking_uri(spec), spec, snapshot, number_text, version.run_id,
                             decision, challenger_value, champion_value, decided_against,
                             tags.get("orchestrator.holdout", ""))
    return RetrainResult(snapshot, decision, name, number_text, champion, challenger_value, champion_value, None,
                         reused=True)
