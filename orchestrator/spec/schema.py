"""The job spec: one typed, strict, versioned description of a training job.

A job file is YAML with ``version: 1``. :func:`load_spec` parses it (plus ``key.path=value`` overrides),
rejects unknown keys with the key path and a close match, checks types and ranges, applies the cross-field
rules in :meth:`JobSpec._cross_field_rules`, and resolves relative paths against the current directory so
that the spec means the same thing on every Ray worker. Defaults live here and nowhere else.
"""

from __future__ import annotations

import datetime
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SPEC_VERSION = 1
PACKAGE_PREFIX = "pkg:"  # model.path "pkg:module/sub/folder": a folder shipped inside an installed package


class SpecError(ValueError):
    """A job spec (or one of the files it names) is wrong; the message says which field and how to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveInt = Annotated[int, Field(gt=0)]


ATTENTION_KERNELS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
FLASH_KERNELS = ("flash_attention_2", "flash_attention_3")
HUB_KERNEL = r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_.-]+)?(:[A-Za-z0-9_.-]+)?$"


def is_hub_kernel(name: str) -> bool:
    """A kernels-hub attention id (``org/name``, optionally ``@revision`` and ``:function``), not a built-in."""
    return bool(re.match(HUB_KERNEL, name))


class ModelSpec(_Strict):
    path: str = Field(description="Local model folder, 'pkg:package/folder' inside an installed package, or a hub id.")
    task: Literal["sequence_classification", "causal_lm"] = "sequence_classification"  # a classifier, or an LM
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the frozen base weights are loaded in; auto follows train.precision "
                            "(bfloat16 under bf16, float16 under fp16, else float32).")
    attn_implementation: str = Field(
        "sdpa", description="Attention kernel: sdpa, eager, flash_attention_2, flash_attention_3 (CUDA GPUs, "
                            "the flash-attn package on the workers) or a kernels-hub id like "
                            "kernels-community/flash-attn (the kernels package).")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model folder. Off unless needed.")
    gguf_file: str | None = Field(
        None, description="A GGUF file inside model.path (e.g. a quantized export): dequantized once per machine "
                          "into a plain Hugging Face folder in $ORCHESTRATOR_CACHE (default ~/.cache/orchestrator).")
    adapter: str | None = Field(
        None, description="Continue training this PEFT adapter instead of a fresh LoRA: a folder, "
                          "models:/NAME@alias or models:/NAME/VERSION. Its LoRA settings replace the lora section.")
    stage_to_local: Literal["auto", "always", "never"] = Field(
        "auto", description="Copy a model.path folder once per node into a node-local cache and load every trial "
                            "and worker from there: auto when the folder is on a network filesystem (nfs, cifs, "
                            "lustre, gpfs, beegfs, ceph, fuse mounts), always, or never. Hub ids and GGUF files "
                            "are cached by their own loaders.")
    local_cache_dir: str | None = Field(
        None, description="The node-local cache of staged bases; null: $ORCHESTRATOR_CACHE/bases "
                          "(default ~/.cache/orchestrator/bases).")
    local_cache_gb: float | None = Field(
        None, gt=0, description="At most this many GB of staged bases per node (least recently used evicted first; "
                                "a base larger than this loads from model.path); null: half the cache's disk.")


    @field_validator("attn_implementation")
    @classmethod
    def _known_attention(cls, name: str) -> str:
        if name not in ATTENTION_KERNELS and not is_hub_kernel(name):
            raise ValueError(f"unknown attention implementation {name!r}; use one of {', '.join(ATTENTION_KERNELS)} "
                             "or a kernels-hub id like kernels-community/flash-attn")
        return name


LM_FORMATS = ("prompt_completion", "chat", "text")


class MixtureSource(_Strict):
    """One source of a training mixture (``data.train`` as a list)."""

    path: str  # a file, folder of shards, datasets folder or glob, as data.train takes
    weight: float = Field(1.0, gt=0, description="Sampling weight; the weights are normalized to probabilities.")


class DataSpec(_Strict):
    train: str | list[MixtureSource] | None = Field(
        None, description="Training data: .jsonl, .csv, .parquet, a datasets save_to_disk folder, a folder of such "
                          "files (shards, read in sorted order) or a glob (data/train-*.parquet); or a list of "
                          "{path, weight}: a mixture, sampled as datasets.interleave_datasets does. Required "
                          "unless retrain.data names snapshots.")
    mixture_stopping: Literal["first_exhausted", "all_exhausted"] = Field(
        "first_exhausted", description="A mixture ends when its first source runs out (undersampling), or when "
                                       "every source has been seen whole (the others repeat: oversampling).")
    mixture_seed: int = 42  # the mixture's sampling order (datasets.interleave_datasets' seed)
    validation: str | None = None  # Validation data, same formats as train; else data.validation_split of train
    test: str | None = None  # Held-out test data, evaluated once after training (test_* metrics)
    text_column: str = "text"  # classification: the column holding the text
    label_column: str = "label"  # classification: the column holding the label (names or integers)
    format: Literal["auto", "prompt_completion", "chat", "text"] = Field(
        "auto", description="causal_lm only: prompt/completion pairs, chat messages (rendered with the model's chat "
                            "template) or plain text; auto picks by the columns of data.train.")
    prompt_column: str = "prompt"  # causal_lm prompt_completion: the prompt column
    completion_column: str = "completion"  # causal_lm prompt_completion: the completion column
    messages_column: str = "messages"  # causal_lm chat: the column of [{role, content}] messages
    train_on: Literal["completion", "all"] = Field(
        "completion", description="causal_lm: loss on completion (chat: assistant) tokens only, or on every token.")
    packing: bool = Field(False, description="causal_lm: pack short examples into rows of max_length tokens.")
    packing_attention: Literal["isolated", "shared"] = Field(
        "isolated", description="isolated: packed examples attend only within themselves (position ids restart); "
                                "shared: plain concatenation, tokens see earlier examples in the row.")
    max_length: int = Field(128, ge=8, le=32768, description="Tokens per example after truncation.")
    validation_split: float | None = Field(
        None, gt=0, lt=0.5, description="Fraction of train held out for validation when no validation file is given."
    )


class LoraSpec(_Strict):
    r: PositiveInt = 8  # LoRA rank: the inner dimension of B·A
    alpha: float = Field(16.0, gt=0)  # scale of the update: alpha/r (alpha/sqrt(r) with use_rslora)
    dropout: float = Field(0.05, ge=0, lt=1)  # dropout on the LoRA input
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names (suffixes) to adapt, or 'all-linear'."
    )
    modules_to_save: list[str] | None = Field(
        None, description="Extra modules trained in full; the classification head is added for you."
    )
    use_rslora: bool = Field(False, description="Scale by alpha/sqrt(r) instead of alpha/r.")
    use_dora: bool = False  # DoRA: learn magnitude and direction separately (PEFT)


FINETUNE_METHODS = ("lora", "full", "ia3", "prompt", "prefix", "qlora")


class MethodSpec(_Strict):
    """What is trained. LoRA is the default and the only method the registry, retrain, merge and compose
    handle; the others exist so `orchestrator compare` can measure them through the same path."""

    name: Literal["lora", "full", "ia3", "prompt", "prefix", "qlora"] = Field(
        "lora", description="lora (the lora section's settings), full fine-tuning, ia3, prompt or prefix tuning "
                            "(PEFT), qlora (LoRA on a 4-bit base: CUDA GPUs with bitsandbytes).")
    num_virtual_tokens: PositiveInt = Field(20, le=512, description="prompt/prefix tuning: virtual tokens.")


class TrainSpec(_Strict):
    epochs: float | None = Field(None, gt=0)  # passes over the training data; set this or max_steps, not both
    max_steps: PositiveInt | None = Field(None, description="Optimizer steps; set this or epochs, not both.")
    micro_batch_size: PositiveInt = Field(16, description="Examples per worker per forward pass.")
    gradient_accumulation_steps: PositiveInt = 1  # micro-batches per optimizer step
    learning_rate: float = Field(2e-4, gt=0, le=1)  # peak learning rate (AdamW)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"  # learning-rate schedule after warmup
    warmup_ratio: float = Field(0.0, ge=0, lt=1)  # share of the steps with a linear warmup from 0
    weight_decay: float = Field(0.0, ge=0)  # AdamW weight decay
    max_grad_norm: float = Field(1.0, ge=0, description="0 turns clipping off.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, "
                                                            "about a third more compute.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="DeepSpeed mixed precision; auto: bf16 on GPUs that have it (compute capability 8.0+), "
                            "fp16 on older GPUs, fp32 on CPU.")
    seed: int = 42  # seeds the model init, the data order and dropout
    eval_every_steps: PositiveInt | None = Field(None, description="Default: once per epoch.")
    checkpoint_every_steps: PositiveInt | None = Field(None, description="Default: at every evaluation.")
    log_every_steps: PositiveInt = 10  # optimizer steps between train-loss log lines
    keep_checkpoints: PositiveInt = 2  # checkpoints Ray Train keeps (the newest)


class DeepSpeedSpec(_Strict):
    zero_stage: int = Field(2, ge=0, le=3)  # what ZeRO shards: 1 optimizer, 2 + grads, 3 + params
    offload_optimizer: bool = False  # keep optimizer states in CPU memory
    offload_params: bool = Field(False, description="Needs zero_stage 3.")
    config: str | None = Field(None, description="Path to a full DeepSpeed JSON; it takes precedence.")


class ScalingSpec(_Strict):
    num_workers: PositiveInt = 2  # Ray Train workers (data-parallel ranks)
    use_gpu: bool = False  # one GPU per worker (gpus_per_worker), NCCL
    cpus_per_worker: float = Field(1.0, gt=0)  # CPUs Ray reserves per worker (and torch threads on CPU)
    gpus_per_worker: float = Field(1.0, ge=0, description="Used only when use_gpu is true.")
    memory_per_worker_gb: float | None = Field(None, gt=0)  # Ray memory resource reserved per worker
    device_memory_gb: float | None = Field(
        None, gt=0, description="Memory of one worker's device (a GPU's memory; on CPU, the RAM one worker may "
                                "use) for the preflight memory check. Default: read from the cluster.")
    host_memory_gb: float | None = Field(
        None, gt=0, description="Host RAM of one node, for the preflight check of what the workers on a node hold "
                                "while loading the base and training (CPU offload included). Default: read from "
                                "the cluster (a node's Ray memory).")
    workers_per_node: PositiveInt | None = Field(
        None, description="How many of the job's workers share one node, for the host-memory check (it does not "
                          "place them). Default: what a node of the cluster holds; before Ray starts, num_workers "
                          "up to 8 on a GPU job (8 GPUs a node), all of them on CPU.")
    collective_timeout_s: PositiveInt = Field(
        1800, description="How long a collective (all-reduce, gather) may wait for the other workers before the "
                          "process group fails the run (torch's timeout: a hung or lost rank).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # Ray's
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts from the last checkpoint; -1: no limit.")
    resource_wait_s: float | None = Field(
        600.0, gt=0, description="How long a (re)starting worker group may wait for its resources (a lost node, a "
                                 "busy cluster) before the run fails; null waits forever (an autoscaling cluster "
                                 "adding nodes).")


class TrackingSpec(_Strict):
    uri: str | None = Field(
        None, description="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else SQLite under output_dir."
    )
    experiment: str = "orchestrator"  # MLflow experiment name
    run_name: str | None = Field(None, description="Default: the job name. Rerunning a run name resumes it.")
    tags: dict[str, str] = Field(default_factory=dict)  # extra tags on every run
    max_pending: int = Field(10_000, ge=10, description="While the server is unreachable, calls kept locally and "
                             "delivered when it returns; past this, the oldest metric batches are dropped (counted).")
    retry_every_s: float = Field(15.0, gt=0, description="How often an unreachable server is tried again; "
                                 "training never waits longer than one short attempt.")

    _plain_uri = field_validator("uri")(classmethod(lambda cls, uri: _no_credentials_in_uri(uri)))


def _no_credentials_in_uri(uri: str | None) -> str | None:
    """A URI with user:password@ would end up in params, logs and the console; MLflow reads credentials from
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN instead."""
    if uri and re.match(r"^[a-z][a-z0-9+.-]*://[^/@]*@", uri, re.IGNORECASE):
        raise ValueError("holds credentials (user:password@); remove them and export MLFLOW_TRACKING_USERNAME and "
                         "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")
    return uri


MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"  # a registered model name: no slashes, no '..' start


class RegistrySpec(_Strict):
    name: str | None = Field(
        None, pattern=MODEL_NAME_PATTERN,
        description="Registered model name in the MLflow model registry. Default: the job name.")
    challenger_alias: str = Field("challenger", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$",
                                  description="Alias a search or retrain gives its newest candidate version.")
    champion_alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$",
                                description="Alias of the version in production; retrain moves it past the gate.")


class Dimension(_Strict):
    """One searched field: exactly one of the keys, e.g. ``{loguniform: [1e-4, 1e-2]}``."""

    choice: list[Any] | None = Field(None, min_length=1, description="Sample one of these values.")
    grid: list[Any] | None = Field(None, min_length=1, description="Try every value (a grid axis).")
    uniform: tuple[float, float] | None = Field(None, description="[low, high]")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high], both > 0")
    randint: tuple[int, int] | None = Field(None, description="[low, high), integers")

    @model_validator(mode="after")
    def _one_kind(self) -> Dimension:
        kinds = [k for k in DIMENSION_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of {', '.join(DIMENSION_KINDS)} (got {', '.join(kinds) or 'none'})")
        low_high = self.uniform or self.loguniform or self.randint
        if low_high and not low_high[0] < low_high[1]:
            raise ValueError(f"{kinds[0]}: low must be below high (got {list(low_high)})")
        if self.loguniform and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: low must be > 0 (got {self.loguniform[0]})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DIMENSION_KINDS if getattr(self, k) is not None)

    @property
    def args(self) -> Any:
        return getattr(self, self.kind)


DIMENSION_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
TUNE_METRICS = {"eval_accuracy": "max", "eval_macro_f1": "max", "eval_loss": "min", "eval_perplexity": "min"}
LM_METRICS = ("eval_loss", "eval_perplexity")  # what a causal_lm job's evaluation reports


class SchedulerSpec(_Strict):
    name: Literal["asha", "median", "hyperband", "fifo"] = Field(
        "asha", description="Early stopping: asha (async successive halving), median stopping, hyperband, "
                            "or fifo (run every trial to the end).")
    grace_period: PositiveInt = Field(1, description="Evaluations a trial always gets before it can be stopped.")
    reduction_factor: float = Field(3.0, gt=1, description="ASHA/HyperBand: keep 1/reduction_factor per rung.")
    max_intervals: PositiveInt | None = Field(
        None, description="Budget per trial in evaluation intervals. Default: all of the job's evaluations.")


class TuneSpec(_Strict):
    space: dict[str, Dimension] = Field(min_length=1, description="Dotted spec field -> how to search it.")
    metric: Literal["eval_accuracy", "eval_macro_f1", "eval_loss", "eval_perplexity"] = Field(
        "eval_accuracy", description="Default: eval_accuracy; eval_loss for causal_lm jobs.")
    mode: Literal["max", "min"] | None = Field(None, description="Default: max for accuracy/F1, min for loss.")
    num_samples: PositiveInt = Field(1, description="Random samples; with grid axes, repeats of the grid.")
    search: Literal["random", "grid", "optuna"] = Field(
        "random", description="random/grid are built in; optuna (TPE) needs pip install 'orchestrator[optuna]'.")
    seed: int = 0  # seeds the search and the grid's order
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)  # early stopping of weak trials
    max_concurrent_trials: Literal["auto"] | PositiveInt = Field(
        "auto", description="auto: as many trials as the cluster's resources hold at once; an integer caps it.")
    rank_tolerance: float = Field(
        0.01, ge=0, lt=1, description="Rank advice: smallest rank within this relative distance of the best.")
    register_best: bool = Field(True, description="Register the best trial's adapter with the challenger alias.")

    def direction(self) -> str:
        return self.mode or TUNE_METRICS[self.metric]


class SnapshotSpec(_Strict):
    """Where retrain finds its data: the newest folder under ``root`` whose name matches ``pattern``."""

    root: str = Field(description="Folder holding one sub-folder per data snapshot.")
    pattern: str = Field("[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*",
                         description="Glob for snapshot folder names; the greatest name is the newest "
                                     "(ISO dates sort right).")
    snapshot: str | None = Field(None, description="Pin one snapshot by folder name (a backfill); default newest.")
    train: str = Field("train.jsonl", description="File names inside a snapshot folder.")
    validation: str | None = "validation.jsonl"  # null: a split of train
    test: str | None = Field("test.jsonl", description="The held-out set champion and challenger are compared on; "
                                                       "without it, the validation file.")

    @field_validator("snapshot", mode="before")
    @classmethod
    def _date_as_name(cls, value: Any) -> Any:
        """YAML reads ``2026-10-01`` as a date; the folder name is meant."""
        return str(value) if isinstance(value, (datetime.date, int, float)) else value


GATE_METRICS = {"accuracy": "max", "macro_f1": "max", "loss": "min",  # sequence_classification
                "eval_loss": "min", "eval_perplexity": "min", "exact_match": "max", "contains": "max"}  # causal_lm
GATE_METRICS_BY_TASK = {"sequence_classification": ("accuracy", "macro_f1", "loss"),
                        "causal_lm": ("eval_loss", "eval_perplexity", "exact_match", "contains")}
GENERATION_METRICS = ("exact_match", "contains")  # scored on greedy completions of the held-out prompts


class GenerationSpec(_Strict):
    """causal_lm: completions for fixed prompts at every evaluation, logged to MLflow as a table."""

    prompts: list[str] | None = Field(None, description="Default: the prompts of the first validation examples.")
    num_prompts: int = Field(3, ge=0, le=32, description="How many validation prompts when prompts is not given; "
                                                         "0 turns samples off.")
    max_new_tokens: PositiveInt = Field(
        48, le=1024, description="Tokens generated per sample prompt; also the cap on each held-out completion a "
                                 "retrain gate on exact_match or contains generates.")


class RetrainSpec(_Strict):
    """``orchestrator retrain``: train a challenger on the newest snapshot, promote it past a gate."""

    data: SnapshotSpec  # the dated data snapshots a retrain picks from
    challenger: Literal["train", "search"] = Field(
        "train", description="train: one training run; search: the job's tune section (best finished trial).")
    metric: Literal["accuracy", "macro_f1", "loss", "eval_loss", "eval_perplexity", "exact_match", "contains"] = Field(
        "accuracy", description="Compared on the held-out set. Classifiers: accuracy, macro_f1 (higher is better), "
                                "loss (lower). causal_lm (default eval_loss): eval_loss, the mean NLL of the trained "
                                "tokens, and eval_perplexity, exp(eval_loss) (lower is better); exact_match, the "
                                "share of held-out prompts whose greedy completion (generation.max_new_tokens at "
                                "most) equals the reference completion, and contains, the share whose completion "
                                "contains the reference, both whitespace-normalised (higher is better).")
    margin: float = Field(0.005, ge=0, description="The challenger must beat the champion by at least this much "
                                                   "(absolute, in the metric's units).")
    minimum: float | None = Field(None, description="With no champion yet, the first one must reach this value.")
    lock_timeout_s: float = Field(600.0, gt=0, description="A promotion lock older than this is taken as stale "
                                                          "(its holder died) and broken.")

    def better(self, challenger: float, champion: float) -> bool:
        if GATE_METRICS[self.metric] == "max":
            return challenger >= champion + self.margin
        return challenger <= champion - self.margin


class JobSpec(_Strict):
    """A whole job. Build it with :func:`load_spec`, not by hand, so paths are resolved."""

    version: Literal[1]  # spec version; must be 1
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # runs, study, model name
    output_dir: str  # where checkpoints, the adapter, Tune state and the embedded MLflow store go
    model: ModelSpec  # the base model
    data: DataSpec  # training, validation and test data
    method: MethodSpec = Field(default_factory=MethodSpec)  # what is trained (LoRA by default)
    lora: LoraSpec = Field(default_factory=LoraSpec)  # LoRA settings
    train: TrainSpec = Field(default_factory=TrainSpec)  # optimizer, schedule and loop settings
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)  # DeepSpeed ZeRO settings
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)  # Ray Train workers and their resources
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)  # MLflow tracking
    registry: RegistrySpec = Field(default_factory=RegistrySpec)  # MLflow model registry names and aliases
    generation: GenerationSpec = Field(default_factory=GenerationSpec)  # causal_lm samples at each evaluation
    tune: TuneSpec | None = Field(None, description="A hyperparameter search (orchestrator tune).")
    retrain: RetrainSpec | None = Field(None, description="Scheduled retraining with a promotion gate.")

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, raw: Any) -> Any:
        """A causal LM search and a causal LM retrain gate default to the loss (it has no accuracy)."""
        if isinstance(raw, dict) and isinstance(raw.get("model"), dict) and raw["model"].get("task") == "causal_lm":
            for section in ("tune", "retrain"):
                if isinstance(raw.get(section), dict) and "metric" not in raw[section]:
                    raw = {**raw, section: {**raw[section], "metric": "eval_loss"}}
        return raw

    @model_validator(mode="after")
    def _cross_field_rules(self) -> JobSpec:
        causal = self.model.task == "causal_lm"
        flash = self.model.attn_implementation in FLASH_KERNELS
        gpu_kernel = flash or is_hub_kernel(self.model.attn_implementation)
        rules = [
            (not causal and self.data.format != "auto", "data.format",
             "prompt_completion, chat and text are causal_lm formats; set model.task: causal_lm"),
            (not causal and self.data.packing, "data.packing", "packing is for causal_lm jobs"),
            (causal and self.tune is not None and self.tune.metric not in LM_METRICS, "tune.metric",
             f"a causal_lm job reports {' and '.join(LM_METRICS)}; use one of them"),
            ((self.train.epochs is None) == (self.train.max_steps is None), "train.epochs",
             "set exactly one of train.epochs and train.max_steps"),
            (self.data.validation is not None and self.data.validation_split is not None, "data.validation_split",
             "give either data.validation or data.validation_split, not both"),
            (self.data.train is None and self.retrain is None, "data.train", "required, not given"),
            (self.data.validation is None and self.data.validation_split is None and self.retrain is None,
             "data.validation",
             "evaluation needs data: set data.validation to a file, or data.validation_split to a fraction"),
            (self.deepspeed.offload_params and self.deepspeed.zero_stage != 3, "deepspeed.offload_params",
             "parameter offload needs deepspeed.zero_stage: 3"),
            (self.train.precision == "fp16" and not self.scaling.use_gpu, "train.precision",
             "fp16 needs GPUs (scaling.use_gpu: true); on CPU use bf16 or fp32"),
            (self.model.dtype == "float16" and not self.scaling.use_gpu,
             "model.dtype", "float16 weights need GPUs; on CPU use auto, float32 or bfloat16"),
            (self.scaling.use_gpu and self.scaling.gpus_per_worker != 1
             and (self.scaling.num_workers > 1 or self.scaling.gpus_per_worker > 1), "scaling.gpus_per_worker",
             "each worker trains on one whole GPU (NCCL runs one rank per GPU, and a worker would leave a second GPU "
             "idle); set scaling.gpus_per_worker: 1 and scale with scaling.num_workers"),
            (self.scaling.collective_timeout_s < 10, "scaling.collective_timeout_s",
             "under 10 s a slow step or checkpoint already fails the run; use the default 1800 or more than 10"),
            (gpu_kernel and not self.scaling.use_gpu, "model.attn_implementation",
             f"{self.model.attn_implementation} runs on CUDA GPUs only; set scaling.use_gpu: true, or use sdpa "
             "(or eager) on CPU"),
            (flash and self.train.precision == "fp32", "model.attn_implementation",
             f"{self.model.attn_implementation} computes in bf16/fp16 only; set train.precision auto, bf16 or fp16, "
             "or use sdpa"),
            (causal and self.data.packing and self.data.packing_attention == "isolated"
             and self.method.name in ("prompt", "prefix"), "data.packing_attention",
             f"isolated packing does not hold under {self.method.name} tuning (PEFT drops or shifts the position "
             "ids that keep packed examples apart, so they would attend to each other); use "
             "data.packing_attention: shared, or data.packing: false"),
            (causal and self.data.packing and self.data.packing_attention == "isolated"
             and is_hub_kernel(self.model.attn_implementation), "data.packing_attention",
             f"isolated packing is not known to hold under the hub kernel {self.model.attn_implementation} (it may "
             "ignore the restarting position ids and let examples attend to each other); use sdpa, eager or "
             "flash_attention_2/3, or data.packing_attention: shared"),
            (self.method.name == "qlora" and not self.scaling.use_gpu, "method.name",
             "qlora needs CUDA GPUs (bitsandbytes 4-bit); set scaling.use_gpu: true or use lora"),
            (self.method.name == "qlora" and self.deepspeed.offload_params, "deepspeed.offload_params",
             "a 4-bit base cannot be offloaded to CPU memory (bitsandbytes computes on the GPU); set "
             "deepspeed.offload_params: false (QLoRA at ZeRO-3 partitions it across the GPUs instead)"),
            (self.method.name != "lora" and self.retrain is not None, "method.name",
             "retrain registers and promotes LoRA adapters; use method lora"),
            (self.method.name not in ("lora", "qlora") and self.model.adapter is not None, "model.adapter",
             "continuing from an adapter is for LoRA jobs"),
            (self.method.name in ("prompt", "prefix") and self.deepspeed.zero_stage == 3, "method.name",
             "prompt and prefix tuning are not supported under ZeRO-3 here; use deepspeed.zero_stage 0-2"),
        ]
        if self.tune:
            tune = self.tune
            rules += [
                (tune.mode is not None and tune.mode != TUNE_METRICS[tune.metric], "tune.mode",
                 f"{tune.metric} is best {TUNE_METRICS[tune.metric]}imised; set mode: {TUNE_METRICS[tune.metric]}"),
                (tune.search == "grid" and any(d.kind not in ("grid", "choice") for d in tune.space.values()),
                 "tune.search", "grid search needs every dimension as grid or choice; use search: random"),
                (tune.search == "optuna" and any(d.kind == "grid" for d in tune.space.values()), "tune.space",
                 "optuna samples its own points; write grid axes as choice"),
                (self.train.checkpoint_every_steps is not None and self.train.eval_every_steps is not None
                 and self.train.checkpoint_every_steps % self.train.eval_every_steps != 0,
                 "train.checkpoint_every_steps", "in a search, checkpoint at evaluation steps (a multiple of "
                 "train.eval_every_steps) so every report to the scheduler carries the metric"),
            ]
        if self.retrain:
            fits = GATE_METRICS_BY_TASK[self.model.task]
            rules += [
                (self.retrain.challenger == "search" and self.tune is None, "retrain.challenger",
                 "search needs a tune section in the job; use challenger: train"),
                (self.retrain.metric not in fits, "retrain.metric",
                 f"a {self.model.task} job has no {self.retrain.metric}; its gate compares one of {', '.join(fits)}"),
                (self.retrain.metric in GENERATION_METRICS and self.data.format == "text", "retrain.metric",
                 f"{self.retrain.metric} compares a completion with the reference one; text data has no reference "
                 "completions (use prompt_completion or chat data, or retrain.metric: eval_loss)"),
            ]
        for broken, field, message in rules:
            if broken:
                raise ValueError(f"@{field}: {message}")
        return self

    def run_name(self) -> str:
        return self.tracking.run_name or self.name

    def registered_model_name(self) -> str:
        return self.registry.name or self.name


# ---------------------------------------------------------------------------------------------- loading


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a job file."""
    return JobSpec.model_json_schema()
