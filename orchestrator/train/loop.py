"""The per-worker training loop, top to bottom: setup, loop (forward, loss, backward, step, report), save.

The same function runs on every Ray Train worker and in-process (``session.LocalContext``). DeepSpeed owns the
optimizer, precision, gradient accumulation, clipping and ZeRO sharding; PEFT owns the LoRA wiring.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import yaml

from orchestrator.plan.batches import (
    as_run,
    deepspeed_config,
    eval_shard,
    lr_multiplier,
    micro_batch_indices,
    plan_batches,
)
from orchestrator.plan.logging_window import LogWindow, window_metrics
from orchestrator.plan.precision import describe, problems
from orchestrator.spec import JobSpec
from orchestrator.tracking.runs import ADAPTER_ARTIFACT
from orchestrator.tracking.sinks import PENDING_FILE, BufferedSink, MetricSink, MlflowSink, NullSink
from orchestrator.train.device import PeakMemory, local_device, use_tf32
from orchestrator.train.modeling import (
    JOB_FILE,
    LABELS_FILE,
    build_peft_model,
    load_checkpoints_as_data,
    model_folder,
    parameter_counts,
    prebuilt_ops,
    read_deepspeed_json,
    resolve_model_path,
    skip_shared_memory_allreduce,
)
from orchestrator.train.partitioned import cast_unpartitioned, zero3_loading
from orchestrator.train.session import WorkerContext
from orchestrator.train.staging import stage_base
from orchestrator.train.tasks import generate, load_data, make_task
from orchestrator.train.zero3 import consolidated_state_dict, generate_zero3

ADAPTER_DIR = "adapter"
SAMPLES_TABLE = "samples.json"  # the MLflow table of generated completions (causal LM)


def train_worker(spec: JobSpec, ctx: WorkerContext, tracking_uri: str | None, run_id: str | None) -> dict[str, float]:
    """Trains the job's LoRA adapter on this worker; returns the final metrics (rank 0's are authoritative)."""
    # ------------------------------------------------------------------ setup
    ctx.progress({"event": "worker_started"})  # lets the driver tell Ray's start-up from ours
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if spec.scaling.use_gpu else "cpu")
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    device = local_device(spec.scaling.use_gpu)  # the GPU Ray's worker context made current, or the CPU
    given = spec  # what the adapter's saved job records: the user's spec (auto stays auto; the run logs the rest)
    user_json = read_deepspeed_json(spec.deepspeed.config)
    spec = as_run(spec, user_json, device)  # the final DeepSpeed config's settings; auto -> this device's
    wrong = problems(spec, device)  # preflight checked a probed (or assumed) device; this is the real one
    if wrong:
        raise RuntimeError("; ".join(wrong))
    staged = stage_base(spec.model, warn=lambda text: ctx.progress({"event": "warning", "text": text}))
    if staged.folder:  # the tokenizer, config and weights all load from this node's copy; `given` keeps model.path
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"path": staged.folder})})
    use_tf32(device)
    torch.manual_seed(spec.train.seed)
    if not spec.scaling.use_gpu:
        torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    sink: MetricSink = NullSink()
    if ctx.rank == 0 and run_id:  # an unreachable server never stops training: calls wait locally (bounded)
        sink = BufferedSink(MlflowSink(tracking_uri, run_id), str(Path(spec.output_dir, PENDING_FILE)),
                            spec.tracking.max_pending, spec.tracking.retry_every_s,
                            warn=lambda text: ctx.progress({"event": "warning", "text": text}))
    copied: list[int | None] = [None] * ctx.world_size
    dist.all_gather_object(copied, staged.copied_bytes)  # bytes this trial read from model.path to stage it
    sink.set_tags({"orchestrator.base_loaded_from": staged.loads_from,
                   "orchestrator.base_bytes_staged": str(sum(n or 0 for n in copied))})
    tokenizer = AutoTokenizer.from_pretrained(model_folder(spec.model))
    task = make_task(spec, load_data(spec), tokenizer)  # classification or causal LM: data, batches, metrics
    plan = plan_batches(spec, task.size("train"))
    memory = PeakMemory(spec.scaling.use_gpu)
    before_model_mb = memory.now_mb()  # what the model and training add is measured from here
    ds_config = deepspeed_config(spec, plan, user_json, prebuilt_ops())  # the final config, a user JSON's included
    # ZeRO-3: transformers loads the base partitioned (rank 0 reading the files) only while this object lives;
    # it is kept to the end of training, since transformers also reads it in generate (None below stage 3)
    hf_deepspeed = zero3_loading(ds_config)
    model = build_peft_model(spec, task.label_names)
    if hf_deepspeed is not None:
        cast_unpartitioned(model, ds_config)  # what PEFT added after the partitioned load
    trainable, total = parameter_counts(model)
    skip_shared_memory_allreduce()
    engine, *_ = deepspeed.initialize(
        # on GPU, the device Ray's worker context made current (the worker's own GPU), not DeepSpeed's default
        # cuda:LOCAL_RANK guess; the two agree for one whole GPU per worker, which the spec requires
        args=SimpleNamespace(device_rank=torch.cuda.current_device()) if spec.scaling.use_gpu else None,
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, plan.total_steps, plan.warmup_steps, spec.train.scheduler)),
        dist_init_required=False,
    )
    load_checkpoints_as_data(engine)
    nodes: list[str | None] = [None] * ctx.world_size
    dist.all_gather_object(nodes, ctx.node_id)  # where each rank runs, recorded on the run
    start_step = 0
    with ctx.restore() as checkpoint:
        if checkpoint:
            _, client_state = engine.load_checkpoint(checkpoint, load_module_strict=False)
            start_step = client_state["step"]
            set_rng_state(client_state)  # same dropout masks as an uninterrupted run
    sink.log_params({"trainable_params": trainable, "total_params": total,
                     "trainable_percent": round(100 * trainable / total, 4),
                     "global_batch_size": plan.global_batch_size, "total_steps": plan.total_steps,
                     "world_size": ctx.world_size, "precision": precision_in_use(engine),
                     "model_dtype": spec.model.dtype, "attn_implementation": spec.model.attn_implementation,
                     "zero_stage": engine.zero_optimization_stage(), "device": device.name,
                     "partitioned_loading": hf_deepspeed is not None})
    sink.set_tags({"orchestrator.worker_nodes": json.dumps(nodes)})
    if start_step:
        sink.set_tags({"orchestrator.resumed_from_step": str(start_step)})
    ctx.progress({"event": "start", "step": start_step, "total": plan.total_steps, "trainable": trainable,
                  "total_params": total, "computes": describe(spec, device)})

    def to_device(batch: dict) -> dict:
        return {k: v.to(engine.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    peaks = {"train": 0.0, "eval": 0.0}  # MB: training steps' peak so far, and the latest evaluation's

    def evaluate(split: str) -> dict[str, float]:
        """The task's metrics on a split (classification: loss, accuracy, macro-F1; causal LM: loss,
        perplexity); every rank runs the same number of forward passes."""
        peaks["train"] = max(peaks["train"], memory.peak_mb())
        memory.reset()
        engine.eval()
        indices, local = eval_shard(task.size(split), ctx.rank, ctx.world_size), []
        size = plan.eval_micro_batch_size
        with torch.no_grad():
            for start in range(0, len(indices), size):
                chunk = indices[start:start + size]
                batch = to_device(task.batch(split, [max(i, 0) for i in chunk])[0])
                rows = task.eval_rows(engine(**batch).logits, batch)
                local += [row for i, row in zip(chunk, rows) if i >= 0]  # -1: padding to equal shard sizes
        gathered: list = [None] * ctx.world_size
        dist.all_gather_object(gathered, local)
        engine.train()
        peaks["eval"] = memory.peak_mb()
        memory.reset()
        return task.metrics([row for part in gathered for row in part])

    prompts = task.sample_prompts() if spec.model.task == "causal_lm" else []
    zero3 = engine.zero_optimization_stage() == 3  # the final config's stage (a user JSON may set it)

    noticed: set[str] = set()  # notices already shown (a too-large model's sampling path: once per job)

    def notice(text: str) -> None:
        if ctx.rank == 0 and text not in noticed:
            noticed.add(text)
            ctx.progress({"event": "warning", "text": text})

    def samples(step: int) -> None:
        """Completions for the fixed prompts, logged as rows of an MLflow table (rank 0; all ranks under ZeRO-3,
        whose partitioned parameters need every rank: gathered once per call where the model fits)."""
        if not prompts or not (ctx.rank == 0 or zero3):
            return
        shown = [readable for readable, _ in prompts]

        def complete(rendered: list[str], synced: bool) -> list[str]:
            return generate(engine.module, tokenizer, rendered, spec.generation.max_new_tokens,
                            add_special_tokens=not task.prompts_have_special_tokens, synced=synced,
                            device=engine.device)

        rendered = [text for _, text in prompts]
        texts = generate_zero3(engine, rendered, complete, notice) if zero3 else complete(rendered, False)
        if ctx.rank == 0:
            sink.log_table({"step": [step] * len(texts), "prompt": shown, "completion": texts}, SAMPLES_TABLE)
            ctx.progress({"event": "samples", "step": step, "samples": list(zip(shown, texts))})

    def checkpoint(step: int, metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory(prefix="orchestrator-ckpt-") as folder:
            engine.save_checkpoint(folder, tag="state", client_state={"step": step, **rng_state(engine.device)},
                                   exclude_frozen_parameters=True)
            ctx.report(metrics, folder, f"step_{step:07d}")

    def test_and_save(final: dict[str, float]) -> tuple[dict[str, float], str]:
        """The final metrics with the test split's added, and the adapter saved (every rank joins both)."""
        if spec.data.test is not None:
            final = {**final, **{f"test_{k}": v for k, v in evaluate("test").items()}}
        saved = given
        if spec.model.task == "causal_lm":  # the adapter's saved job names the format it was trained on
            saved = given.model_copy(update={"data": given.data.model_copy(update={"format": task.data.format})})
        return final, save_adapter(engine, saved, tokenizer, task.label_names, ctx.rank)

    # ------------------------------------------------------------------ a rerun of a finished job
    if start_step >= plan.total_steps:  # nothing left to train: evaluate the restored state anyway, publish again
        final, adapter = test_and_save({f"eval_{k}": v for k, v in evaluate("validation").items()})
        # the upload goes before the report (in a search, Tune may end the trial on seeing it); the metrics were
        # logged by the run that trained it, and a rerun logs nothing twice
        if ctx.rank == 0:
            sink.log_artifacts(adapter, ADAPTER_ARTIFACT)
            sink.close()
        # no checkpoint: the final one already exists, and registering it twice would let Ray's retention
        # delete the directory both entries point to
        ctx.report(final, None, "")
        if ctx.rank == 0:
            ctx.progress({"event": "done", "adapter": adapter, **final})
        return final

    # ------------------------------------------------------------------ loop
    if start_step == 0 and spec.model.task == "causal_lm":  # the base model: what training is compared with
        base = {f"eval_{k}": v for k, v in evaluate("validation").items()}
        sink.log_metrics(base, 0)
        ctx.progress({"event": "eval", "step": 0, "total": plan.total_steps, **base})
        samples(0)
    engine.train()
    window = LogWindow()  # since the last log line
    metrics: dict[str, float] = {}
    train_seconds = 0.0  # this session's time in forward/backward/step, the denominator of overhead figures
    timers = {"evaluation_seconds": 0.0, "report_seconds": 0.0}  # evaluation; checkpoint saving + reporting to Ray
    for step in range(start_step, plan.total_steps):
        step_start = time.perf_counter()
        for micro in range(plan.gradient_accumulation_steps):
            micro_step = step * plan.gradient_accumulation_steps + micro
            indices = micro_batch_indices(plan, task.size("train"), ctx.rank, micro_step, spec.train.seed)
            batch, tokens = task.batch("train", indices)
            loss = engine(**to_device(batch)).loss
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer and scheduler only at the accumulation boundary
            window = window.add(loss=loss.item() / plan.gradient_accumulation_steps, tokens=tokens,
                                examples=len(indices))
        window = window.add(steps=1, seconds=time.perf_counter() - step_start)  # training time only
        done = step + 1
        if done % spec.train.log_every_steps == 0 or done == plan.total_steps:
            rates = window_metrics(window.summed(sum_over_workers(window.sums(), engine.device)), ctx.world_size,
                                   train_seconds)
            train_seconds = rates["train_seconds"]
            peak_mb = max(peaks["train"], memory.peak_mb())  # the training steps', evaluations left out
            metrics = {**rates, "peak_memory_mb": peak_mb, "train_memory_mb": peak_mb - before_model_mb,
                       "learning_rate": engine.get_lr()[0],
                       "epoch": done * plan.gradient_accumulation_steps / plan.micro_batches_per_epoch}
            sink.log_metrics(metrics, done)
            ctx.progress({"event": "step", "step": done, "total": plan.total_steps, **metrics})
            window = LogWindow()
        last = done == plan.total_steps
        is_eval = done % plan.eval_every_steps == 0 or last
        is_checkpoint = done % plan.checkpoint_every_steps == 0 and not last  # the last one follows the save
        if is_eval:
            started = time.perf_counter()
            evaluation = {f"eval_{k}": v for k, v in evaluate("validation").items()}
            evaluation["peak_eval_memory_mb"] = peaks["eval"]
            samples(done)
            timers["evaluation_seconds"] += time.perf_counter() - started
            metrics = {**metrics, **evaluation, **timers, "step": done, "trainable_params": trainable,
                       "total_params": total}
            sink.log_metrics(evaluation, done)
            ctx.progress({"event": "eval", "step": done, "total": plan.total_steps, **evaluation})
        started = time.perf_counter()
        if is_checkpoint:
            checkpoint(done, metrics)
        elif is_eval and not last:
            ctx.report(metrics, None, "")
        timers["report_seconds"] += time.perf_counter() - started

    # ------------------------------------------------------------------ save
    final, adapter = test_and_save(metrics)  # the last evaluation is in metrics, and was logged in the loop
    if ctx.rank == 0:  # before the final report: in a search, Tune may end the trial (workers and all) on seeing it
        sink.log_metrics({k: v for k, v in final.items() if k.startswith("test_")}, plan.total_steps)
        sink.log_artifacts(adapter, ADAPTER_ARTIFACT)
        sink.close()  # what the server did not take by now waits in output_dir/mlflow_pending.jsonl
    checkpoint(plan.total_steps, final)  # the final state, carrying the run's result metrics
    if ctx.rank == 0:
        ctx.progress({"event": "done", "adapter": adapter, **final})
    return final


def sum_over_workers(values: list[float], device) -> list[float]:
    """Element-wise sums over every rank. The tensor is made on the engine's device: an NCCL group takes only
    CUDA tensors, gloo CPU ones. The one tensor collective this package issues (objects travel by
    ``all_gather_object``, which picks the device itself)."""
    import torch
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def rng_state(device) -> dict:
    """What makes a resumed run draw the same dropout masks: the CPU generator, and the CUDA generator of the
    worker's device (its only one: a worker trains on one GPU)."""
    import torch

    state = {"torch_rng": torch.get_rng_state(), "cuda_rng": {}}
    if device.type == "cuda":
        state["cuda_rng"] = {str(device): torch.cuda.get_rng_state(device)}
    return state


def set_rng_state(client_state: dict) -> None:
    """Restores :func:`rng_state`'s generators; a CUDA state saved for another device index (a restarted worker
    group placed this rank elsewhere) goes to this worker's own device."""
    import torch

    torch.set_rng_state(client_state["torch_rng"])
    saved = client_state.get("cuda_rng") or {}
    if saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(next(iter(saved.values())), torch.cuda.current_device())


def precision_in_use(engine) -> str:
    """The mixed precision the engine runs (the final DeepSpeed config's, a user JSON's included)."""
    return "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"


def save_adapter(engine, spec: JobSpec, tokenizer, label_names: list[str] | None, rank: int) -> str:
    """Writes the trained adapter in plain PEFT format to ``output_dir/adapter`` (atomically, rank 0).

    Under ZeRO-3 the trainable parameters are partitioned across ranks, so every rank joins the gather: an
    adapter's (small) trainable parameters at once; a fully fine-tuned model one module at a time onto rank 0's
    CPU (:func:`orchestrator.train.zero3.consolidated_state_dict`), never the whole model on every rank. The
    saved tensors are then checked to be non-empty, finite and trained (LoRA B starts at zero).
    """
    import deepspeed

    model = engine.module
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = {id(p): n for n, p in model.named_parameters()}
    target = Path(spec.output_dir, ADAPTER_DIR)
    zero3 = engine.zero_optimization_stage() == 3  # the final config's stage, not the spec's field
    if zero3 and spec.method.name == "full":
        state = consolidated_state_dict(engine)
    else:
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None, enabled=zero3):
            if rank == 0:
                state = {names[id(p)]: p.detach().to("cpu", copy=True) for p in trainable}
    if rank != 0:
        return str(target)
    Path(spec.output_dir).mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".adapter-", dir=spec.output_dir))
    if spec.model.gguf_file is None:  # the base as the job names it, not this node's staged copy of it
        for config in getattr(model, "peft_config", {}).values():
            config.base_model_name_or_path = resolve_model_path(spec.model.path)
    model.save_pretrained(partial, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    if label_names is not None:
        (partial / LABELS_FILE).write_text(json.dumps(label_names, indent=1))
    (partial / JOB_FILE).write_text(yaml.safe_dump(spec.model_dump(), sort_keys=False))
    _check_adapter(partial, spec.method.name)
    if target.exists():
        shutil.rmtree(target)
    os.replace(partial, target)
    return str(target)


def _check_adapter(folder: Path, method: str = "lora") -> None:
    """Refuses to publish empty, non-finite or (LoRA) untrained weights; full fine-tuning saved a whole model."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    problems = [name for name, t in tensors.items() if t.numel() == 0 or not bool(t.float().isfinite().all())]
    if method not in ("lora", "qlora"):
        if not tensors or problems:
            raise RuntimeError(f"refusing to publish broken {method} weights in {folder}: {len(tensors)} tensors, "
                               f"empty or non-finite: {problems[:5]}")
        return
    lora_b = [t for name, t in tensors.items() if "lora_B" in name]
    if not lora_b or problems or all(float(t.float().abs().max()) == 0 for t in lora_b):
        raise RuntimeError(f"refusing to publish a broken adapter in {folder}: "
                           f"{len(lora_b)} LoRA B tensors, empty or non-finite: {problems[:5]}, or all zero")
