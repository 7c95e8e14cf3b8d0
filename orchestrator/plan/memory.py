"""Memory per device before launch: ``orchestrator plan`` and the preflight of ``train`` / ``tune`` (host RAM
per node: :mod:`orchestrator.plan.host_memory`; what fits both, and the plan's table: :mod:`orchestrator.plan.fitting`).

Two halves. :func:`model_shape` reads the model's config and builds it on the meta device (no weights read)
to count parameters: all of them, those in the blocks' linear layers (what a 4-bit base quantizes) and those
LoRA trains at the spec's rank (PEFT wired on the meta model, so the classifier head it adds to
``modules_to_save`` is counted). :func:`estimate` is plain arithmetic over that shape:

- **Weights** on the device: every parameter in the training dtype (2 bytes under bf16/fp16 mixed precision,
  since DeepSpeed casts the module; else the model's dtype); QLoRA: the blocks' linear weights in NF4 with
  double-quantised block scales (0.516 bytes), the rest in bf16. Only ZeRO-3 shards them, frozen ones too,
  across the data-parallel workers; stages 0-2 keep the whole (frozen) base on every device.
- **Model states** of the T trainable parameters: gradients (2 or 4 bytes) and Adam's optimizer states (fp32
  m and v, plus an fp32 master copy under mixed precision): 16 bytes per trainable parameter in all, the
  ZeRO paper's count. ZeRO-1 shards the optimizer states, ZeRO-2 the gradients too, ZeRO-3 the parameters
  too; optimizer offload moves the optimizer states to CPU memory, parameter offload (stage 3) the weights.
  ZeRO-1/2 also hold a gradient reduce bucket (DeepSpeed's default 5e8 elements, or T when smaller).
  DeepSpeed's own estimators count every parameter as trainable, which is wrong for LoRA: not used.
- **Activations** saved for the backward, per layer: s·b·(c_h·h + c_kv·h_kv + c_i·i) elements (s sequence
  length, b micro-batch, h hidden, h_kv key/value width, i MLP width; coefficients below count the tensors
  each block saves, as in Korthikanti et al. 2022), plus each LoRA-adapted projection's dropped-out input
  and mask, plus the attention probabilities, their dropout mask and the dropped copy (heads·s² per
  example each) for eager attention or attention dropout (SDPA's fused kernels save none, but fall back to
  the math kernel under dropout). Gradient checkpointing keeps one s·b·h input per layer and recomputes one
  layer at a time. A causal LM adds its logits, their fp32 log-softmax and the backward's fp32 gradients of
  both (b·s·vocab each). The backward's working memory is one more layer.
- **Evaluation**, its forward pass with nothing saved for a backward: one layer's working tensors at the
  evaluation micro-batch (a classifier's is twice the training one, a causal LM's the same:
  :func:`orchestrator.plan.batches.eval_rows_per_pass`), and a causal LM's logits plus one float32 loss chunk
  and its log-softmax (the loss is taken in chunks of positions). The device holds the larger of it and the
  training step's activations.
- **Runtime**: a fixed allowance per worker (CUDA context, cuBLAS workspace and allocator slack on a GPU;
  the Python process with torch, transformers and DeepSpeed imported on a CPU).

Checked in tests against the published anchor (16 bytes per trainable parameter: ~112 GB of model states
for full fine-tuning of a 7B model) and against peak memory measured on this machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.plan.batches import EVAL_LOSS_CHUNK_ELEMENTS, eval_rows_per_pass
from orchestrator.plan.precision import resolve
from orchestrator.spec import JobSpec, SpecError

GiB = 1024**3
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit values, 8-bit scale per 64, fp32 scale per 256 scales
RUNTIME_GPU = 1.5 * GiB  # CUDA context + cuBLAS workspace + caching-allocator slack
RUNTIME_CPU = 1.0 * GiB  # a worker process with torch, transformers, PEFT and DeepSpeed imported
REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)
METHODS = ("full", "lora", "qlora")


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model, counted on the meta device."""

    total_params: int
    block_linear_params: int  # nn.Linear weights inside the transformer blocks (what 4-bit quantizes)
    lora_trainable: int  # LoRA at the spec's rank and targets, plus any head PEFT trains whole
    lora_inputs_per_layer: int  # summed in_features of the LoRA-adapted projections of one block
    method_trainable: int  # what the job's own method trains when it is not LoRA (IA3, prompt, prefix)
    layers: int
    hidden: int
    kv_hidden: int  # key/value width (grouped-query attention: kv_heads * head_dim)
    intermediate: int
    heads: int
    vocab: int
    gated_mlp: bool  # SwiGLU-style gate_proj/up_proj (Llama, Mistral, Qwen) vs a single fc + activation
    causal_lm: bool
    attention_dropout: float  # > 0: SDPA falls back to the math kernel, which keeps the probabilities
    largest_shard: int | None = None  # bytes of the checkpoint's largest weight file, when the folder has them


@dataclass(frozen=True)
class Setting:
    method: str  # full | lora | qlora | peft (the job's IA3, prompt or prefix tuning)
    zero_stage: int
    micro_batch: int
    checkpointing: bool
    offload_optimizer: bool = False
    offload_params: bool = False

    def describe(self) -> str:
        extra = [f"micro-batch {self.micro_batch}"]
        if self.checkpointing:
            extra.append("gradient checkpointing")
        if self.offload_optimizer:
            extra.append("optimizer offload")
        if self.offload_params:
            extra.append("parameter offload")
        return f"{self.method}, ZeRO-{self.zero_stage}, " + ", ".join(extra)


@dataclass(frozen=True)
class Estimate:
    setting: Setting
    trainable: int
    weights: float  # bytes per device
    gradients: float
    optimizer: float
    buffers: float  # ZeRO reduce bucket
    activations: float
    runtime: float
    evaluation: float = 0.0  # the evaluation forward's working memory (held instead of the activations)

    @property
    def model_states(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def training(self) -> float:
        """Everything training allocates on the device: what the measurement tests compare."""
        return self.model_states + self.buffers + self.activations

    @property
    def total(self) -> float:
        """The device's peak: training or evaluation, whichever needs more, and the runtime."""
        return self.training + max(0.0, self.evaluation - self.activations) + self.runtime


def estimate(shape: ModelShape, setting: Setting, *, world: int, seq_len: int, precision: str = "fp32",
             dtype: str = "float32", eager_attention: bool = False, lora_dropout: float = 0.05,
             gpu: bool = True) -> Estimate:
    """Bytes per device for one setting; see the module docstring for each term."""
    mixed = precision in ("bf16", "fp16")
    weight_bytes = 2 if mixed or dtype != "float32" else 4
    full = setting.method == "full"
    trainable = shape.total_params if full else \
        shape.method_trainable if setting.method == "peft" else shape.lora_trainable
    frozen = 0 if full else shape.total_params
    if setting.method == "qlora":
        quantized = shape.block_linear_params
        weights = quantized * NF4_BYTES + (frozen - quantized) * 2 + trainable * 2
    else:
        weights = (frozen + trainable) * weight_bytes
    grad_bytes = 2 if mixed else 4
    gradients = trainable * grad_bytes
    optimizer = trainable * (12 if mixed else 8)
    stage, n = setting.zero_stage, max(1, world)
    if stage >= 1:
        optimizer /= n
    if stage >= 2:
        gradients /= n
    if stage == 3:
        weights /= n
    if setting.offload_optimizer and stage >= 1:
        optimizer = 0.0
        if stage >= 2:
            gradients = 0.0  # ZeRO-Offload moves the reduced gradient partitions to CPU too
    if setting.offload_params and stage == 3:
        weights = 2 * weight_bytes * _largest_layer(shape)  # the gathered layer and the prefetched next one
    buffers = min(trainable, REDUCE_BUCKET) * grad_bytes if stage in (1, 2) else 0.0
    activations = _activations(shape, setting, seq_len, 2 if weight_bytes == 2 else 4, eager_attention,
                               lora_dropout if not full else 0.0)
    evaluation = _evaluation(shape, setting, seq_len, 2 if weight_bytes == 2 else 4)
    return Estimate(setting, trainable, weights, gradients, optimizer, buffers, activations,
                    RUNTIME_GPU if gpu else RUNTIME_CPU, evaluation)


def _evaluation(shape: ModelShape, setting: Setting, s: int, act: int) -> float:
    tokens = s * eval_rows_per_pass(setting.micro_batch, shape.causal_lm)
    h, i = shape.hidden, shape.intermediate
    layer = tokens * ((6 * h + 3 * shape.kv_hidden + 4 * i) if shape.gated_mlp else (8 * h + 2 * i)) * act
    logits = tokens * shape.vocab
    head = logits * act + 2 * 4 * min(logits, EVAL_LOSS_CHUNK_ELEMENTS) if shape.causal_lm else 0
    return layer + head + 2 * tokens * h * act  # + the embeddings' output and the residual stream


def _largest_layer(shape: ModelShape) -> int:
    return (shape.total_params - shape.vocab * shape.hidden) // max(1, shape.layers)


def _activations(shape: ModelShape, setting: Setting, s: int, act: int, eager: bool, dropout: float) -> float:
    b, h, i = setting.micro_batch, shape.hidden, shape.intermediate
    tokens = s * b
    if shape.gated_mlp:  # pre-norm block: norm in/out, q, k, v, rotated q/k, attention out; gate, up, act, product
        elements = tokens * (6 * h + 3 * shape.kv_hidden + 4 * i)
        masks = 0
    else:  # post-norm BERT/GPT block: in, q, k, v, context, LN in/out x2; fc out, activation out; dropout masks
        elements = tokens * (8 * h + 2 * i)
        masks = tokens * 2 * h  # hidden dropout masks (1 byte)
    if setting.method in ("lora", "qlora") and dropout > 0:
        elements += tokens * shape.lora_inputs_per_layer  # LoRA's dropped-out copy of each adapted input
        masks += tokens * shape.lora_inputs_per_layer
    per_layer = elements * act + masks
    if eager or shape.attention_dropout > 0:  # probabilities, their dropout mask and the dropped copy, per head
        per_layer += (2 * act + 1) * b * shape.heads * s * s
    if setting.checkpointing:
        stored = shape.layers * tokens * h * act + per_layer  # layer inputs + one layer being recomputed
    else:
        stored = shape.layers * per_layer
    # A causal LM's logits, their fp32 log-softmax and, in the backward, the gradients of both (fp32).
    head = tokens * shape.vocab * (act + 12) if shape.causal_lm else 0
    return stored + per_layer + head + 4 * tokens * h * act  # + the backward's working layer, embeddings


def settings_for(spec: JobSpec) -> list[Setting]:
    """The table `plan` prints: each method at each ZeRO stage, with the job's micro-batch and checkpointing."""
    return [Setting(method, stage, spec.train.micro_batch_size, spec.train.gradient_checkpointing)
            for method in METHODS for stage in range(4)]


def job_setting(spec: JobSpec) -> Setting:
    ds = spec.deepspeed
    name = spec.method.name
    return Setting(name if name in METHODS else "peft", ds.zero_stage, spec.train.micro_batch_size,
                   spec.train.gradient_checkpointing, ds.offload_optimizer and ds.zero_stage >= 1,
                   ds.offload_params and ds.zero_stage == 3)


def candidates(spec: JobSpec, method: str = "lora") -> list[Setting]:
    """Ways to run ``method``, cheapest first: the job's own ZeRO stage then the other stages below 3, then a
    smaller micro-batch (the job keeps its global batch through gradient accumulation), then gradient
    checkpointing (~1/3 more compute), then ZeRO-3, then optimizer offload, then parameter offload (CPU
    traffic every step)."""
    own = spec.deepspeed.zero_stage
    low_stages = tuple(dict.fromkeys([own] * (own < 3) + [0, 1, 2]))
    micro, found = spec.train.micro_batch_size, []
    batches = [micro // 2**k for k in range(4) if micro // 2**k >= 1 and micro % 2**k == 0]
    for offload_params in (False, True):
        for offload_optimizer in (False, True):
            for stage3 in (False, True):
                for checkpointing in (False, True):
                    for batch in batches:
                        for stage in ((3,) if stage3 else low_stages):
                            if (offload_optimizer and stage == 0) or (offload_params and stage != 3):
                                continue
                            found.append(Setting(method, stage, batch, checkpointing, offload_optimizer,
                                                 offload_params))
    return list(dict.fromkeys(found))


def estimate_job(spec: JobSpec, shape: ModelShape, setting: Setting, gpu: bool | None = None) -> Estimate:
    """The estimate for the job at ``setting``; precision ``auto`` as it resolves on the job's kind of device
    (:func:`orchestrator.plan.precision.resolve`: bf16 on a GPU, fp32 on CPU)."""
    run = resolve(spec)
    return estimate(shape, setting, world=spec.scaling.num_workers, seq_len=spec.data.max_length,
                    precision=run.train.precision, dtype=run.model.dtype, lora_dropout=spec.lora.dropout,
                    eager_attention=spec.model.attn_implementation == "eager",
                    gpu=spec.scaling.use_gpu if gpu is None else gpu)


def breakdown(found: Estimate) -> str:
    parts = [("weights", found.weights), ("gradients", found.gradients), ("optimizer", found.optimizer),
             ("buckets", found.buffers), ("activations", found.activations), ("runtime", found.runtime)]
    return ", ".join(f"{name} {value / GiB:.2f}" for name, value in parts if value)


def parse_memory(text: str, flag: str = "--device-memory") -> float:
    """'80GiB', '80GB', '24 GiB', '512MiB', or a number of GiB; returns bytes. ``flag`` names the option in errors."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B)?\s*", text or "", re.IGNORECASE)
    if not match:
        raise SpecError(f"{flag}: '{text}' is not a size like 80GiB, 24GB or 512MiB")
    unit = (match.group(2) or "GiB").upper()
    scale = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[unit[0]]
    if "I" not in unit:
        scale = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[unit[0]]
    return float(match.group(1)) * scale


def overrides(spec: JobSpec, setting: Setting) -> list[str]:
    """The ``key.path=value`` overrides that make the job run ``setting`` (the global batch kept through
    gradient accumulation)."""
    changes = {"deepspeed.zero_stage": setting.zero_stage, "deepspeed.offload_optimizer": setting.offload_optimizer,
               "deepspeed.offload_params": setting.offload_params,
               "train.gradient_checkpointing": setting.checkpointing, "train.micro_batch_size": setting.micro_batch,
               "train.gradient_accumulation_steps": spec.train.gradient_accumulation_steps
               * (spec.train.micro_batch_size // setting.micro_batch)}
    current = {"deepspeed.zero_stage": spec.deepspeed.zero_stage,
               "deepspeed.offload_optimizer": spec.deepspeed.offload_optimizer,
               "deepspeed.offload_params": spec.deepspeed.offload_params,
               "train.gradient_checkpointing": spec.train.gradient_checkpointing,
               "train.micro_batch_size": spec.train.micro_batch_size,
               "train.gradient_accumulation_steps": spec.train.gradient_accumulation_steps}
    return [f"{k}={str(v).lower()}" for k, v in changes.items() if current[k] != v]


MEMORY_PATHS = ("lora.r", "train.micro_batch_size", "data.max_length")  # search dimensions that grow memory


def heaviest(spec: JobSpec) -> JobSpec:
    """The job at the largest rank, micro-batch and length its search space can pick (what must fit)."""
    if spec.tune is None:
        return spec
    from orchestrator.spec import spec_from_dict

    raw = spec.model_dump()
    for path, dimension in spec.tune.space.items():
        if path not in MEMORY_PATHS:
            continue
        values = dimension.choice or dimension.grid
        largest = max(values) if values else (dimension.randint[1] - 1 if dimension.randint else
                                              int((dimension.uniform or dimension.loguniform)[1]))
        section, key = path.split(".")
        raw[section][key] = largest
    return spec_from_dict(raw)
