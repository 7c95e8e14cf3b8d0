"""Checks that need the user's files but no cluster: data, labels, batch plan, model config, LoRA targets.

``orchestrator validate`` runs exactly this; ``orchestrator train`` runs it before Ray starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.data import TaskData, load_task_data
from orchestrator.modeling import (
    check_adapter_labels,
    check_target_modules,
    linear_module_names,
    read_deepspeed_json,
)
from orchestrator.planning import BatchPlan, deepspeed_config, plan_batches
from orchestrator.spec import JobSpec


@dataclass(frozen=True)
class Preflight:
    data: TaskData
    plan: BatchPlan
    total_params: int
    linear_modules: int


def preflight(spec: JobSpec) -> Preflight:
    """Raises :class:`orchestrator.spec.SpecError` naming the field to fix; returns what it learned."""
    data = load_task_data(spec.data)
    plan = plan_batches(spec, len(data.train.texts))
    deepspeed_config(spec, plan, read_deepspeed_json(spec.deepspeed.config))  # checks a user JSON's batch keys
    names, total = linear_module_names(spec, len(data.label_names))
    check_target_modules(spec.lora, names)
    if spec.model.adapter and not spec.model.adapter.startswith("models:/"):
        check_adapter_labels(spec.model.adapter, data.label_names)
    return Preflight(data, plan, total, len(names))
