"""Resources and placement: what one worker reserves, whether a cluster can place a job, how many trials fit at
once, how long placing may wait, and each worker's share of a node's memory. Pure."""

from __future__ import annotations

import math

from orchestrator.spec import JobSpec


def worker_resources(spec: JobSpec) -> dict[str, float]:
    """Ray resources one training worker asks for."""
    scaling = spec.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    if scaling.memory_per_worker_gb:
        resources["memory"] = scaling.memory_per_worker_gb * 1024**3
    return resources


def placement_problem(spec: JobSpec, nodes: list[dict[str, float]]) -> str | None:
    """Why ``num_workers`` workers cannot be placed on nodes with these total resources, or None if they can.

    A worker cannot span nodes, so this packs workers node by node; STRICT_SPREAD needs one node each and
    STRICT_PACK needs one node for all.
    """
    need, count, strategy = worker_resources(spec), spec.scaling.num_workers, spec.scaling.placement_strategy
    fits = [min(int(node.get(k, 0) // v) for k, v in need.items() if v > 0) for node in nodes]
    if strategy == "STRICT_SPREAD":
        placeable = sum(1 for n in fits if n >= 1)
    elif strategy == "STRICT_PACK":
        placeable = max(fits, default=0)
    else:
        placeable = sum(fits)
    if placeable >= count:
        return None
    have = {k: sum(node.get(k, 0) for node in nodes) for k in need}
    shown = ", ".join(f"{k} {_amount(k, v)} per worker (cluster total {_amount(k, have[k])})" for k, v in need.items())
    return (f"scaling.num_workers: {count} workers ({strategy}) need {shown} on {len(nodes)} node(s); only "
            f"{placeable} fit. Lower scaling.num_workers or scaling.cpus_per_worker / gpus_per_worker, "
            f"or add nodes")


def _amount(key: str, value: float) -> str:
    return f"{value / 1024**3:.1f} GiB" if key == "memory" else f"{value:g}"
def trials_that_fit(nodes: list[dict[str, float]], per_worker: dict[str, float], num_workers: int,
                    strategy: str) -> int:
    """How many trials' worker groups the cluster holds at once (0 if not even one fits).

    A worker cannot span nodes; PACK/SPREAD may spread a trial's workers over any nodes, STRICT_PACK keeps them
    on one node, STRICT_SPREAD puts each on a different node.
    """
    fits = [min(int(node.get(k, 0) // v) for k, v in per_worker.items() if v > 0) for node in nodes]
    if strategy == "STRICT_PACK":
        return sum(n // num_workers for n in fits)
    if strategy == "STRICT_SPREAD":
        trials = 0
        while sum(min(n, trials + 1) for n in fits) >= (trials + 1) * num_workers and trials < 10_000:
            trials += 1
        return trials
    return sum(fits) // num_workers


def concurrency(requested: str | int, fitting: int, num_trials: int) -> int:
    """Trials run at once: what the cluster holds ('auto'), or the requested cap if lower; never more than the
    trials there are. Running more than fit would leave trials waiting on each other's resources."""
    limit = fitting if requested == "auto" else min(int(requested), fitting)
    return max(1, min(limit, num_trials))


def placement_budget(resource_wait_s: float | None) -> tuple[float, int]:
    """(seconds one attempt at placing the worker group may wait, Ray Train's controller_failure_limit): the
    attempts add up to ``scaling.resource_wait_s``; None keeps Ray's default of retrying forever (-1)."""
    if resource_wait_s is None:
        return 60.0, -1
    attempt = min(resource_wait_s, 60.0)
    return attempt, math.ceil(resource_wait_s / attempt) - 1


def memory_share(nodes: list[dict[str, float]], per_worker: dict[str, float], num_workers: int) -> float | None:
    """The least of a node's Ray ``memory`` one CPU worker can count on: on each node that holds any of the
    job's workers, the node's memory split among as many of them as it holds; None if no node says."""
    shares = []
    for node in nodes:
        fit = min(int(node.get(k, 0) // v) for k, v in per_worker.items() if v > 0)
        if fit and node.get("memory"):
            shares.append(node["memory"] / min(fit, num_workers))
    return min(shares) if shares else None
