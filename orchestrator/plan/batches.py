"""Pure planning: batch and step arithmetic, the learning-rate schedule, data sharding, the DeepSpeed
config and whether the workers fit the cluster. Plain functions over plain data; no Ray, no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from orchestrator.plan.precision import resolve
from orchestrator.spec import JobSpec, SpecError


@dataclass(frozen=True)
class BatchPlan:
    """How many examples, micro-batches and optimizer steps the job runs (per worker unless said)."""

    world_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    examples_per_worker: int  # per epoch, after padding the shards to equal length
    micro_batches_per_epoch: int
    total_steps: int  # optimizer steps
    warmup_steps: int
    eval_every_steps: int
    checkpoint_every_steps: int
    # Evaluation's micro-batch. A classifier's logits are a few numbers per row: twice the training size. A
    # causal LM's are rows x tokens x vocabulary (Llama-3: 128k): the training size, which keeps evaluation's
    # peak under the training step's (no gradients, no saved activations; the loss is taken in chunks).
    eval_micro_batch_size: int = 0

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.micro_batch_size * self.gradient_accumulation_steps

    @property
    def steps_per_epoch(self) -> float:
        return self.micro_batches_per_epoch / self.gradient_accumulation_steps


def plan_batches(spec: JobSpec, num_train_examples: int) -> BatchPlan:
    """Derives the step counts from the spec and the size of the training set."""
    train, world = spec.train, spec.scaling.num_workers
    if num_train_examples < world:
        raise SpecError(f"data.train: {num_train_examples} examples cannot be split across "
                        f"{world} workers; add data or lower scaling.num_workers")
    per_worker = math.ceil(num_train_examples / world)
    micro_per_epoch = math.ceil(per_worker / train.micro_batch_size)
    steps_per_epoch = micro_per_epoch / train.gradient_accumulation_steps
    total = train.max_steps or max(1, math.floor(train.epochs * steps_per_epoch))
    epoch_steps = max(1, math.floor(steps_per_epoch))
    eval_every = min(train.eval_every_steps or epoch_steps, total)
    return BatchPlan(
        world_size=world,
        micro_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        examples_per_worker=per_worker,
        micro_batches_per_epoch=micro_per_epoch,
        total_steps=total,
        warmup_steps=math.floor(train.warmup_ratio * total),
        eval_every_steps=eval_every,
        checkpoint_every_steps=min(train.checkpoint_every_steps or eval_every, total),
        eval_micro_batch_size=eval_micro_batch(spec),
    )


EVAL_LOSS_CHUNK_ELEMENTS = 1 << 25  # float32 logits the evaluation loss takes at once (128 MiB)


def eval_micro_batch(spec: JobSpec) -> int:
    """Rows per evaluation forward pass (see :attr:`BatchPlan.eval_micro_batch_size`)."""
    return eval_rows_per_pass(spec.train.micro_batch_size, spec.model.task == "causal_lm")


def eval_rows_per_pass(micro_batch: int, causal_lm: bool) -> int:
    return micro_batch * (1 if causal_lm else 2)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Factor on the peak learning rate before optimizer step ``step`` (0-based): linear warmup, then decay."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


@lru_cache(maxsize=4)  # this epoch's shard (and the next one's, at an epoch boundary) on every rank in-process
def epoch_shard(num_examples: int, rank: int, world_size: int, epoch: int, seed: int) -> np.ndarray:
    """This rank's example indices for one epoch: one seeded permutation shared by all ranks, dealt round robin,
    wrapped so every rank gets ``ceil(n / world)`` (all ranks must run the same number of steps).

    Computed once per epoch and kept (read-only, int32 below 2**31 rows: 4 bytes per row of this rank's share),
    since every micro-step asks for its slice: shuffling a Python list of all rows per step cost 0.5 s per
    micro-batch at 1M rows and 8 s at 10M; now under 1 us, and 0.75 s once per epoch at 10M (BENCHMARKS.md,
    "Data at scale")."""
    order = np.random.default_rng(seed * 1_000_003 + epoch).permutation(num_examples)
    per_worker = math.ceil(num_examples / world_size)
    padded = np.resize(order, per_worker * world_size)  # wraps around to fill the last rows
    shard = padded[rank::world_size].astype(np.int32 if num_examples < 2**31 else np.int64)
    shard.flags.writeable = False  # shared by every caller through the cache
    return shard


def micro_batch_indices(plan: BatchPlan, num_examples: int, rank: int, micro_step: int, seed: int) -> list[int]:
    """Example indices of global micro-batch ``micro_step`` on ``rank``; a pure function of the step, so a
    resumed run sees exactly the batches an uninterrupted run would."""
    epoch, position = divmod(micro_step, plan.micro_batches_per_epoch)
    shard = epoch_shard(num_examples, rank, plan.world_size, epoch, seed)
    start = position * plan.micro_batch_size
    return shard[start:start + plan.micro_batch_size].tolist()


def eval_shard(num_examples: int, rank: int, world_size: int) -> list[int]:
    """This rank's evaluation indices, padded with -1 so every rank runs the same number of batches."""
    per_worker = math.ceil(num_examples / world_size)
    return [i if i < num_examples else -1 for i in range(rank, per_worker * world_size, world_size)]


def deepspeed_config(spec: JobSpec, plan: BatchPlan, user_config: dict[str, Any] | None = None,
                     prebuilt: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The DeepSpeed config dict for the job; ``user_config`` (the JSON at deepspeed.config, read by
    :func:`orchestrator.train.modeling.read_deepspeed_json`) wins, with our batch keys, and its ``"auto"``
    precision switches take the spec's. ``prebuilt``: DeepSpeed ops compiled into its installed wheel
    (:func:`orchestrator.train.modeling.prebuilt_ops`); only those are ever used, nothing is JIT-built."""
    spec = resolve(spec)  # precision auto: the job's kind of device (the loop passes a spec resolved for its own)
    train, ds = spec.train, spec.deepspeed
    batch = {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "train_batch_size": plan.global_batch_size,
    }
    if user_config is not None:
        for key, value in batch.items():
            if user_config.get(key, "auto") not in ("auto", value):
                raise SpecError(f"deepspeed.config: {key} is {user_config[key]} in {ds.config} but the spec "
                                f"gives {value}; remove it from the JSON or set 'auto'")
        precision = {key: {**user_config[key], "enabled": train.precision == key}
                     for key in ("bf16", "fp16") if isinstance(user_config.get(key), dict)
                     and user_config[key].get("enabled") == "auto"}
        return {**user_config, **precision, **batch}
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer and ds.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": spec.scaling.use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": spec.scaling.use_gpu}
    if ds.zero_stage == 3:
        # Off: it gates only DeepSpeed's own save_16bit_model (a pickled pytorch_model.bin), which we never call.
        # Our save gathers an adapter's (small) trainable parameters itself, and a fully fine-tuned model one
        # module at a time (orchestrator.train.zero3.consolidated_state_dict), whatever a user JSON sets here.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        **batch,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": train.learning_rate, "weight_decay": train.weight_decay, "betas": [0.9, 0.999],
                       **_adam(spec, prebuilt)},
        },
        "gradient_clipping": train.max_grad_norm,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # progress is ours; keep DeepSpeed's own step logs quiet
        "wall_clock_breakdown": False,
    }


def as_configured(spec: JobSpec, user_config: dict[str, Any] | None) -> JobSpec:
    """The spec as DeepSpeed will run it: a user JSON's ZeRO stage, offload and precision replace the spec's
    fields (the JSON takes precedence), so the planner, the memory check and the loop see the final config.
    Without a JSON, the spec itself."""
    if user_config is None:
        return spec
    zero = user_config.get("zero_optimization") or {}
    offloaded = lambda key: (zero.get(key) or {}).get("device", "none") in ("cpu", "nvme")  # noqa: E731
    enabled = {key: (user_config.get(key) or {}).get("enabled", False) for key in ("bf16", "fp16")}
    precision = "bf16" if enabled["bf16"] is True else "fp16" if enabled["fp16"] is True else \
        spec.train.precision if "auto" in enabled.values() else "fp32"
    stage = int(zero.get("stage", 0))
    deepspeed = spec.deepspeed.model_copy(update={"zero_stage": stage, "offload_params": offloaded("offload_param"),
                                                  "offload_optimizer": offloaded("offload_optimizer")})
    return spec.model_copy(update={"deepspeed": deepspeed,
                                   "train": spec.train.model_copy(update={"precision": precision})})


def as_run(spec: JobSpec, user_config: dict[str, Any] | None, device=None) -> JobSpec:
    """The spec as the workers run it on ``device`` (:class:`orchestrator.plan.precision.Device`; default, the
    job's kind of device): the final DeepSpeed config's settings (:func:`as_configured`), then precision ``auto``
    resolved (:func:`orchestrator.plan.precision.resolve`). Preflight and the loop both ask this."""
    return resolve(as_configured(spec, user_config), device)


def _adam(spec: JobSpec, prebuilt: frozenset[str]) -> dict[str, Any]:
    """Which AdamW DeepSpeed builds. torch's, unless the DeepSpeed op for where the optimizer steps is compiled
    into its wheel: DeepSpeed's FusedAdam (GPU) and CPU Adam (CPU, offload) are otherwise JIT-built on first use
    on every fresh node (a minute or more, needing nvcc), under a lock file that a worker killed mid-build leaves
    behind, after which every start on that node waits forever. On GPU, torch's single-kernel (fused) AdamW.
    DeepSpeed reads the flags from "params"; beside it, they are silently ignored."""
    on_cpu = not spec.scaling.use_gpu or (spec.deepspeed.offload_optimizer and spec.deepspeed.zero_stage > 0)
    if ("cpu_adam" if on_cpu else "fused_adam") in prebuilt:
        return {}
    return {"torch_adam": True, **({} if on_cpu else {"fused": True})}
