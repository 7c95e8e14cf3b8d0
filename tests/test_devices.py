"""What a worker's device decides, on CPU: precision ``auto``, TF32, attention kernels, DeepSpeed's optimizer and
ZeRO stage from the final config, the RNG state in checkpoints, the device of collectives.

The GPU half of each (NCCL, bf16 on a real GPU, CUDA RNG) runs in ``tests/test_gpu.py`` under ``make gpu-check``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.plan.batches import as_configured, deepspeed_config, plan_batches
from orchestrator.plan.precision import ASSUMED_GPU, CPU, Device, describe, problems, resolve
from orchestrator.spec import SpecError, spec_from_dict
from orchestrator.train.loop import train_worker
from orchestrator.train.session import LocalContext
from tests.tiny import start_two_ranks, write_job

ROOT = Path(__file__).resolve().parents[1]
H100 = Device("cuda", "NVIDIA H100", (9, 0), True, 80e9, frozenset({"flash_attn"}))
A100 = Device("cuda", "NVIDIA A100", (8, 0), True, 80e9)
V100 = Device("cuda", "Tesla V100", (7, 0), False, 32e9)


# ------------------------------------------------------------------------------------------ precision auto


@pytest.mark.parametrize(("device", "precision", "dtype"), [
    (CPU, "fp32", "float32"), (H100, "bf16", "bfloat16"), (V100, "fp16", "float16"), (ASSUMED_GPU, "bf16", "bfloat16")])
def test_precision_auto_resolves_by_device(job, device, precision, dtype):
    spec = spec_from_dict(job(scaling={"use_gpu": device.kind == "cuda"}))
    assert (spec.train.precision, spec.model.dtype) == ("auto", "auto")  # the defaults
    run = resolve(spec, device)
    assert (run.train.precision, run.model.dtype) == (precision, dtype)
    ds = deepspeed_config(run, plan_batches(run, 192))
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (precision == "bf16", precision == "fp16")


def test_a_given_precision_is_kept_and_weights_follow_it(job):
    spec = spec_from_dict(job(scaling={"use_gpu": True}, train={"precision": "fp32"}))
    assert (resolve(spec, H100).train.precision, resolve(spec, H100).model.dtype) == ("fp32", "float32")
    spec = spec_from_dict(job(scaling={"use_gpu": True}, model={"dtype": "float32"}))
    assert (resolve(spec, H100).train.precision, resolve(spec, H100).model.dtype) == ("bf16", "float32")


def test_tf32_is_on_for_fp32_work_on_ampere_and_newer_only():
    from orchestrator.train.device import use_tf32

    before = torch.get_float32_matmul_precision()
    try:
        use_tf32(V100)
        assert torch.get_float32_matmul_precision() == "highest"
        use_tf32(CPU)
        assert torch.get_float32_matmul_precision() == "highest"
        use_tf32(A100)
        assert torch.get_float32_matmul_precision() == "high"  # TF32 matmuls
    finally:
        torch.set_float32_matmul_precision(before)
    assert A100.tf32 and H100.tf32 and not V100.tf32 and not CPU.tf32


def test_what_cannot_run_on_a_device_is_named_with_its_fix(job):
    bf16 = spec_from_dict(job(scaling={"use_gpu": True}, train={"precision": "bf16"}))
    assert any(p.startswith("train.precision: bf16 needs a GPU with bf16") and "Tesla V100" in p
               for p in problems(bf16, V100))
    assert problems(bf16, A100) == [] and problems(bf16, ASSUMED_GPU) == []  # unseen: the workers check again
    flash = spec_from_dict(job(scaling={"use_gpu": True}, model={"attn_implementation": "flash_attention_2"}))
    missing = problems(resolve(flash, A100), A100)
    assert missing and "needs the flash_attn module" in missing[0] and "pip install flash-attn" in missing[0]
    assert problems(resolve(flash, H100), H100) == []
    assert "does not support flash_attention_2" in problems(resolve(flash, H100), H100, {"flash": False})[0]
    fa3 = spec_from_dict(job(scaling={"use_gpu": True}, model={"attn_implementation": "flash_attention_3"}))
    assert any("Hopper" in p for p in problems(resolve(fa3, A100), A100))
    assert "TF32" in describe(spec_from_dict(job(scaling={"use_gpu": True}, train={"precision": "fp32"})), A100)
    assert describe(spec_from_dict(job(scaling={"num_workers": 1})), CPU) == \
        "precision fp32 (weights float32), attention sdpa, on CPU"


def test_qlora_without_bitsandbytes_or_cuda_is_refused_naming_the_field(job):
    qlora = spec_from_dict(job(method={"name": "qlora"}, scaling={"use_gpu": True}))
    missing = problems(resolve(qlora, A100), A100)
    assert missing and missing[0].startswith("method.name: qlora needs the bitsandbytes module")
    with_bnb = Device("cuda", "NVIDIA A100", (8, 0), True, 80e9, frozenset({"bitsandbytes"}))
    assert problems(resolve(qlora, with_bnb), with_bnb) == []
    assert problems(resolve(qlora, ASSUMED_GPU), ASSUMED_GPU) == []  # unseen: each worker checks its own
    with pytest.raises(SpecError, match="method.name: qlora needs CUDA GPUs"):
        spec_from_dict(job(method={"name": "qlora"}))
    zero3 = spec_from_dict(job(method={"name": "qlora"}, scaling={"use_gpu": True}, deepspeed={"zero_stage": 3}))
    assert zero3.deepspeed.zero_stage == 3  # allowed: PEFT's DeepSpeed guide runs QLoRA at ZeRO-3


def test_weights_load_where_they_train(job, monkeypatch):
    """The from_pretrained options: a device map to the worker's own GPU at ZeRO 0-2 (QLoRA too), none under
    ZeRO-3 partitioned loading (transformers refuses one there), none on CPU; QLoRA's 4-bit values are stored in
    the compute dtype only where ZeRO-3 must partition them."""
    import types

    from orchestrator.train.modeling import load_options

    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))  # only imported, never run
    lora = resolve(spec_from_dict(job(scaling={"use_gpu": True})), A100)
    assert load_options(lora, partitioned=False, cuda_index=3)["device_map"] == {"": 3}
    assert "device_map" not in load_options(lora, partitioned=True, cuda_index=3)
    cpu = resolve(spec_from_dict(job()), CPU)
    assert "device_map" not in load_options(cpu, partitioned=False, cuda_index=None)
    qlora = resolve(spec_from_dict(job(method={"name": "qlora"}, scaling={"use_gpu": True})), A100)
    stages = {partitioned: load_options(qlora, partitioned=partitioned, cuda_index=1) for partitioned in (False, True)}
    assert stages[False]["device_map"] == {"": 1} and "device_map" not in stages[True]
    assert stages[False]["quantization_config"].bnb_4bit_quant_storage == torch.uint8
    assert stages[True]["quantization_config"].bnb_4bit_quant_storage == torch.bfloat16  # = compute dtype
    assert stages[True]["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16


def test_local_device_names_the_fix_when_a_gpu_job_sees_no_cuda():
    from orchestrator.train.device import local_device

    assert local_device(False) == CPU
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="scaling.use_gpu is true but this worker sees no CUDA device"):
            local_device(True)


@pytest.mark.parametrize(("sections", "field", "text"), [
    ({"model": {"attn_implementation": "flash_attention_2"}}, "model.attn_implementation", "CUDA GPUs only"),
    ({"model": {"attn_implementation": "kernels-community/flash-attn"}}, "model.attn_implementation",
     "CUDA GPUs only"),
    ({"model": {"attn_implementation": "flash"}}, "model.attn_implementation", "unknown attention implementation"),
    ({"scaling": {"use_gpu": True}, "model": {"attn_implementation": "flash_attention_2"},
      "train": {"precision": "fp32"}}, "model.attn_implementation", "bf16/fp16 only"),
    ({"scaling": {"collective_timeout_s": 0}}, "scaling.collective_timeout_s", "greater than 0"),
    ({"scaling": {"collective_timeout_s": 5}}, "scaling.collective_timeout_s", "under 10 s"),
    ({"scaling": {"use_gpu": True, "num_workers": 2, "gpus_per_worker": 0.5}}, "scaling.gpus_per_worker",
     "one whole GPU"),
    ({"train": {"precision": "fp16"}}, "train.precision", "fp16 needs GPUs"),
])
def test_device_settings_that_cannot_work_are_refused_at_load(job, sections, field, text):
    with pytest.raises(SpecError) as refused:
        spec_from_dict(job(**sections))
    assert field in str(refused.value) and text in str(refused.value)


def test_isolated_packing_that_peft_would_break_is_refused(lm_job):
    for method in ("prompt", "prefix"):
        with pytest.raises(SpecError, match="data.packing_attention: isolated packing does not hold under"):
            spec_from_dict(lm_job(method={"name": method}, data={"packing": True}))
        spec_from_dict(lm_job(method={"name": method}, data={"packing": True, "packing_attention": "shared"}))


def test_validate_prints_what_the_job_computes_in(tmp_path, job, capsys):
    from orchestrator.cli import main

    assert main(["validate", str(write_job(tmp_path / "job.yaml", job()))]) == 0
    assert "computes: precision fp32 (weights float32), attention sdpa, on CPU" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ DeepSpeed's config


def test_no_deepspeed_op_is_jit_built_for_a_gpu_job(job):
    gpu = spec_from_dict(job(scaling={"use_gpu": True}))
    adam = deepspeed_config(gpu, plan_batches(gpu, 192))["optimizer"]["params"]
    assert adam["torch_adam"] is True and adam["fused"] is True  # torch's one-kernel AdamW, not FusedAdam
    built = deepspeed_config(gpu, plan_batches(gpu, 192), prebuilt=frozenset({"fused_adam"}))["optimizer"]["params"]
    assert "torch_adam" not in built  # DeepSpeed's op, compiled into its wheel
    offload = spec_from_dict(job(scaling={"use_gpu": True}, deepspeed={"offload_optimizer": True}))
    adam = deepspeed_config(offload, plan_batches(offload, 192))["optimizer"]["params"]
    assert adam["torch_adam"] is True and "fused" not in adam  # the step runs on the CPU, not in CPU Adam


def test_a_user_deepspeed_json_is_what_the_plan_and_the_loop_see(job, tmp_path):
    user = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}, "bf16": {"enabled": "auto"}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    spec = spec_from_dict(job(scaling={"use_gpu": True}, deepspeed={"config": str(path)}))
    assert spec.deepspeed.zero_stage == 2  # the spec's field, which the JSON overrides
    final = resolve(as_configured(spec, user), H100)
    assert (final.deepspeed.zero_stage, final.deepspeed.offload_optimizer, final.train.precision) == (3, True, "bf16")
    assert deepspeed_config(final, plan_batches(final, 192), user)["bf16"] == {"enabled": True}  # "auto" filled
    from orchestrator.plan.memory import job_setting

    assert job_setting(final).zero_stage == 3


TWO_RANKS = """
import json, os, sys, yaml
from contextlib import contextmanager
import torch.distributed as dist
from orchestrator.spec import spec_from_dict
from orchestrator.train.loop import train_worker

class Rank:  # the WorkerContext of one of two plain processes: a gloo group, nothing persisted
    def __init__(self, rank):
        self.rank, self.world_size, self.node_id = rank, 2, "local"
        dist.init_process_group("gloo", rank=rank, world_size=2)
    @contextmanager
    def restore(self):
        yield None
    def report(self, metrics, checkpoint_dir, name):
        pass
    def progress(self, update):
        if update["event"] == "samples":
            print(json.dumps(update["samples"]), flush=True)

from orchestrator.train import loop
from orchestrator.train.partitioned import is_partitioned
built = loop.build_peft_model
def spied(spec, labels):  # what the loop's loading gave, before DeepSpeed touched it
    model = built(spec, labels)
    print(json.dumps({"partitioned_at_load": is_partitioned(model)}), flush=True)
    return model
loop.build_peft_model = spied

rank = int(os.environ["RANK"])
final = train_worker(spec_from_dict(yaml.safe_load(open(sys.argv[1]))), Rank(rank), None, None)
print(json.dumps({"rank": rank, "eval_loss": final["eval_loss"]}))
"""


def test_the_loop_acts_on_the_final_deepspeed_config_not_the_spec_field(lm_job, tmp_path):
    """A user DeepSpeed JSON at ZeRO-3 under a spec left at stage 2, on two ranks: every rank must join each
    generated token's forward pass (partitioned parameters), or rank 0's sample generation waits forever."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0,
                                "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}}}))
    job = write_job(tmp_path / "job.yaml", lm_job(deepspeed={"config": str(path)}, generation={"num_prompts": 1,
                    "max_new_tokens": 3}, train={"epochs": None, "max_steps": 2, "eval_every_steps": 2}))
    ranks = start_two_ranks(TWO_RANKS, str(job))
    try:
        outputs = [rank.communicate(timeout=300) for rank in ranks]
    except subprocess.TimeoutExpired:
        pytest.fail("the two ranks did not finish in 300 s: sample generation under ZeRO-3 ran on rank 0 alone")
    finally:
        for rank in ranks:
            rank.kill()
    assert [rank.returncode for rank in ranks] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    lines = [json.loads(line) for line in outputs[0][0].splitlines() if line.startswith(("[", "{"))]
    assert any(isinstance(line, list) for line in lines)  # rank 0 generated its samples
    # the HfDeepSpeedConfig was built from the final config (the JSON's stage 3, not the spec's 2)
    loaded = [json.loads(line) for out, _ in outputs for line in out.splitlines() if "partitioned_at_load" in line]
    assert loaded == [{"partitioned_at_load": True}] * 2
    assert Path(tmp_path, "out", "adapter", "adapter_model.safetensors").exists()


def test_checkpoints_carry_the_cuda_rng_state_beside_the_cpu_one(job, tmp_path):
    from orchestrator.train.loop import rng_state, set_rng_state

    steps = {"epochs": None, "max_steps": 4, "checkpoint_every_steps": 2, "eval_every_steps": 2}
    spec = spec_from_dict(job(scaling={"num_workers": 1}, train=steps))
    train_worker(spec, LocalContext(str(tmp_path / "ckpt")), None, None)
    saved = torch.load(tmp_path / "ckpt" / "step_0000002" / "state" / "mp_rank_00_model_states.pt",
                       weights_only=False, map_location="cpu")
    assert isinstance(saved["torch_rng"], torch.Tensor) and saved["cuda_rng"] == {}  # no CUDA device here
    state = rng_state(torch.device("cpu"))
    expected = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------------------------------ collectives

TENSOR_COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
                      "broadcast", "reduce", "all_to_all", "all_to_all_single", "send", "recv", "scatter", "gather"}


def test_the_loop_sums_over_workers_on_the_engine_device(monkeypatch):
    """The log window's sums go to the collective on the device passed (the engine's): an NCCL group takes
    only CUDA tensors. A stand-in collective records where its tensor lives ("meta" stands for a GPU here)."""
    import torch.distributed as dist

    from orchestrator.train.loop import sum_over_workers

    seen = []

    class Stop(Exception):
        pass

    def all_reduce(tensor, *args, **kwargs):
        seen.append((tensor.device.type, tensor.dtype))
        raise Stop

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    with pytest.raises(Stop):
        sum_over_workers([1.0, 2.0], torch.device("meta"))
    assert seen == [("meta", torch.float64)]


def test_every_tensor_collective_in_the_package_goes_through_sum_over_workers():
    """Objects travel by ``all_gather_object`` (torch picks the device); any tensor collective elsewhere would
    need its own device handling, and this test then asks for it."""
    found = []
    for path in sorted((ROOT / "orchestrator").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for function in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
            for call in [n for n in ast.walk(function) if isinstance(n, ast.Call)]:
                name = getattr(call.func, "attr", None) or getattr(call.func, "id", None)
                receiver = ast.unparse(call.func.value) if isinstance(call.func, ast.Attribute) else ""
                if name in TENSOR_COLLECTIVES and receiver.split(".")[-1] in ("dist", "distributed", "comm"):
                    found.append((path.relative_to(ROOT).as_posix(), function.name, name))
    assert found and {(p, f) for p, f, _ in found} == {("orchestrator/train/loop.py", "sum_over_workers")}
