"""Host memory per node, by invariant, on Llama-2-7B's and Llama-3-70B's configs alone (no weights): the
loading path each setting takes, ZeRO-3's partitioned loading against every worker loading the whole base, CPU
offload's 16 bytes per trainable parameter split over the workers, a CPU job counted once (its RAM is its device),
the shard read from the model folder, workers per node, recommendations that fit the device and the node, the plan's
host column, and ``train`` refusing a node that is too small before Ray starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.plan import fitting
from orchestrator.plan.fitting import Budget, fit_job
from orchestrator.plan.host_memory import DEFAULT_SHARD, HOST_RUNTIME_GPU, loading_path, node_memory, workers_per_node
from orchestrator.plan.memory import RUNTIME_CPU, GiB, Setting, job_setting, parse_memory
from orchestrator.spec import SpecError
from orchestrator.train.shape import model_shape
from tests.test_memory import LLAMA2_7B, _spec
from tests.tiny import write_job

LLAMA3_70B = {**LLAMA2_7B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
              "max_position_embeddings": 8192, "rope_theta": 500000.0}
GPU_80GB = 80e9  # an 80 GB GPU, in bytes (an H100's 79.6 GiB is a little more)


def _folder(tmp_path_factory, name: str, config: dict) -> Path:
    folder = tmp_path_factory.mktemp(name)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def llama7b(tmp_path_factory) -> Path:
    return _folder(tmp_path_factory, "llama7b", LLAMA2_7B)


@pytest.fixture(scope="module")
def llama70b(tmp_path_factory) -> Path:
    return _folder(tmp_path_factory, "llama70b", LLAMA3_70B)


@pytest.fixture(scope="module")
def shape7b(llama7b):
    return model_shape(_spec(llama7b), None)  # every 7B test here trains LoRA r8 on q and v


@pytest.fixture(scope="module")
def shape70b(llama70b):
    return model_shape(_70b(llama70b, 3), None)  # a meta 70B takes seconds to build: once


def _70b(folder: Path, stage: int, **sections):
    """LoRA r16 on q/k/v/o, 16 workers (2 nodes x 8 GPUs), bf16, 2,048 tokens, gradient checkpointing."""
    return _spec(folder, lora={"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                 data={"max_length": 2048}, train={"micro_batch_size": 1, "gradient_checkpointing": True},
                 scaling={"num_workers": 16, "use_gpu": True}, deepspeed={"zero_stage": stage}, **sections)


def test_lora_r16_on_70b_over_two_nodes_of_eight_80gb_gpus_fits_at_zero3_and_not_at_zero2(llama70b, shape70b):
    spec, shape = _70b(llama70b, 2), shape70b
    assert shape.total_params == 70_553_706_496  # Llama-3-70B, counted on the meta device
    budget = Budget(GPU_80GB, workers_per_node=8)
    zero2 = fit_job(spec, shape, job_setting(spec), 8)
    zero3 = fit_job(_70b(llama70b, 3), shape, job_setting(_70b(llama70b, 3)), 8)
    assert zero2.device.weights > 2 * shape.total_params > GPU_80GB  # stages 0-2: every GPU holds the bf16 base
    assert not zero2.fits(budget) and zero3.fits(budget)
    assert zero3.device.weights == pytest.approx((2 * shape.total_params + 2 * shape.lora_trainable) / 16)
    with pytest.raises(SpecError, match=r"needs about 1\d\d\.\d GiB per worker .* has 74\.5 GiB; this fits: "
                                        r"lora, ZeRO-3.*deepspeed\.zero_stage=3"):
        fitting.check_fits(spec, shape, budget)


def test_zero3_partitioned_loading_fits_a_1tb_node_where_loading_the_whole_base_on_every_worker_does_not(llama70b,
                                                                                                         shape70b):
    spec, shape = _70b(llama70b, 3), shape70b
    setting = job_setting(spec)
    whole = fit_job(spec, shape, setting, 8, partitioned=False).host
    parted = fit_job(spec, shape, setting, 8).host
    base = 2 * shape.total_params  # 141 GB of bf16 weights
    assert whole.path == "whole" and whole.per_node == 8 * (base + HOST_RUNTIME_GPU)  # 1.1 TB
    assert parted.path == "partitioned" and parted.reader == DEFAULT_SHARD  # rank 0 reads one 5 GB shard more
    embedding = 128256 * 8192 * 2  # the largest module built whole before zero.Init partitions it
    assert parted.per_node == 8 * (embedding + HOST_RUNTIME_GPU) + DEFAULT_SHARD
    assert whole.per_node / parted.per_node > 25
    node = Budget(host=1e12, workers_per_node=8)  # a 1 TB node
    assert not fit_job(spec, shape, setting, 8, partitioned=False).host_fits(node)
    assert fit_job(spec, shape, setting, 8).host_fits(node)
    # Parameter offload keeps the partition (141 GB / 16 = 8.8 GB) in host RAM, pinned, on every worker
    offload = fit_job(spec, shape, Setting("lora", 3, 1, True, offload_params=True), 8).host
    partition = (base + 2 * shape.lora_trainable) / 16
    assert 8.7e9 < partition < 8.9e9
    assert offload.per_node == pytest.approx(8 * (embedding + partition + HOST_RUNTIME_GPU) + DEFAULT_SHARD)


def test_each_setting_loads_by_its_path_and_a_device_map_holds_one_shard_per_worker(llama7b, shape7b):
    assert loading_path(Setting("lora", 3, 1, False), gpu=True) == "partitioned"
    assert loading_path(Setting("lora", 3, 1, False), gpu=False) == "partitioned"
    assert loading_path(Setting("lora", 2, 1, False), gpu=True) == "device map"
    assert loading_path(Setting("qlora", 3, 1, False), gpu=True) == "device map"  # 4-bit: straight to the GPU
    assert loading_path(Setting("lora", 2, 1, False), gpu=False) == "whole"
    assert loading_path(Setting("lora", 3, 1, False), gpu=True, partitioned=False) == "whole"
    assert loading_path(Setting("lora", 2, 1, False), gpu=True, partitioned=False) == "device map"
    assert loading_path(Setting("qlora", 2, 1, False), gpu=True, device_map=False) == "whole"
    spec = _spec(llama7b, scaling={"num_workers": 8, "use_gpu": True})
    shape = shape7b
    found = fit_job(spec, shape, Setting("lora", 2, 4, False), 8).host
    assert found.loading == DEFAULT_SHARD < 2 * shape.total_params  # 13.5 GB base, one 5 GB shard at a time
    assert found.per_node == 8 * (DEFAULT_SHARD + HOST_RUNTIME_GPU)


def test_optimizer_offload_keeps_16_bytes_per_trainable_parameter_in_host_ram_split_over_the_workers(llama7b, shape7b):
    spec = _spec(llama7b, scaling={"num_workers": 8, "use_gpu": True})
    shape = shape7b
    plain = fit_job(spec, shape, Setting("full", 2, 4, False), 8).host
    offload = fit_job(spec, shape, Setting("full", 2, 4, False, offload_optimizer=True), 8).host
    assert plain.training == 0
    assert offload.training == 16 * shape.total_params / 8  # fp32 master, m, v, gradients: 13.5 GB per worker
    assert offload.per_node == 8 * (offload.training + HOST_RUNTIME_GPU)
    lora = fit_job(spec, shape, Setting("lora", 2, 4, False, offload_optimizer=True), 8).host
    assert lora.training == 16 * shape.lora_trainable / 8


def test_a_cpu_job_counts_its_ram_once_the_larger_of_loading_and_training(llama7b, shape7b):
    spec = _spec(llama7b, scaling={"num_workers": 2}, train={"precision": "fp32"})
    shape = shape7b
    setting = Setting("lora", 2, 4, False)
    found = fit_job(spec, shape, setting, 2)
    assert found.host.path == "whole" and found.host.loading == 4 * shape.total_params + RUNTIME_CPU
    assert found.host.training == found.device.total  # the device estimate is this RAM, runtime included
    assert found.host.per_node == 2 * max(found.host.loading, found.device.total)  # not their sum
    offload = fit_job(spec, shape, Setting("full", 2, 4, False, offload_optimizer=True), 2)
    assert offload.host.training == offload.device.total + 16 * shape.total_params / 2  # "offloaded" to the same RAM


def test_the_shard_is_read_from_the_model_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 3000)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 1000)
    spec = _spec(tmp_path, scaling={"num_workers": 8, "use_gpu": True}, deepspeed={"zero_stage": 3})
    shape = model_shape(spec, None)
    assert shape.largest_shard == 3000
    assert fit_job(spec, shape, job_setting(spec), 8).host.reader == 3000
    indexed = tmp_path / "indexed"
    indexed.mkdir()
    (indexed / "config.json").write_text(json.dumps(LLAMA2_7B))
    (indexed / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 12e9}, "weight_map": {"a": "one.safetensors", "b": "two.safetensors",
                                                           "c": "three.safetensors"}}))
    assert model_shape(_spec(indexed), None).largest_shard == 4e9


def test_workers_per_node_and_a_nodes_memory_come_from_the_spec_then_the_cluster(llama7b):
    gpu = _spec(llama7b, scaling={"num_workers": 16, "use_gpu": True})
    assert workers_per_node(gpu, []) == 8  # before a cluster says: 8 GPUs a node
    assert workers_per_node(_spec(llama7b, scaling={"num_workers": 4, "use_gpu": True}), []) == 4
    assert workers_per_node(_spec(llama7b, scaling={"num_workers": 3}), []) == 3  # CPU: one machine
    assert workers_per_node(_spec(llama7b, scaling={"num_workers": 4, "placement_strategy": "STRICT_SPREAD"}),
                            []) == 1
    nodes = [{"CPU": 64, "GPU": 4, "memory": 500 * GiB}, {"CPU": 64, "GPU": 4, "memory": 400 * GiB}]
    assert workers_per_node(gpu, nodes) == 4
    assert node_memory(gpu, nodes) == (400 * GiB, "a node's Ray memory")
    assert node_memory(gpu, [{"CPU": 64, "memory": 900 * GiB}]) == (None, "the cluster's nodes")  # holds no GPU worker
    given = _spec(llama7b, scaling={"num_workers": 16, "use_gpu": True, "workers_per_node": 2, "host_memory_gb": 64})
    assert workers_per_node(given, nodes) == 2 and node_memory(given, nodes) == (64 * GiB, "scaling.host_memory_gb")


def test_the_recommendation_fits_the_node_too_and_the_plan_shows_host_memory_per_node(llama7b, shape7b, tmp_path,
                                                                                       capsys):
    spec = _spec(llama7b, scaling={"num_workers": 8, "use_gpu": True})
    shape = shape7b
    budget = Budget(80 * GiB, 40 * GiB, 8)  # the device fits ZeRO-2; eight workers' shards and runtimes do not
    as_is = fit_job(spec, shape, job_setting(spec), 8)
    assert as_is.device_fits(budget) and not as_is.host_fits(budget)
    best = fitting.recommend(spec, shape, budget)
    assert best.setting.zero_stage == 3 and best.fits(budget)
    with pytest.raises(SpecError, match=r"GiB of host memory per node \(8 workers x \(loading 4\.7 \(device map\).*"
                                        r"a node has 40\.0 GiB; this fits: lora, ZeRO-3"):
        fitting.check_fits(spec, shape, budget)
    job = write_job(tmp_path / "job.yaml", spec.model_dump())
    assert main(["plan", str(job), "--device-memory", "80GiB", "--host-memory", "40GiB"]) == 0
    out = capsys.readouterr().out
    header = next(line.split() for line in out.splitlines() if line.startswith("method"))
    rows = {(r[0], r[1]): r for r in (line.split() for line in out.splitlines()) if r[:1] in (["lora"], ["full"])}
    column = header.index("host/node")
    assert rows["lora", "2"][column] == f"{as_is.host.per_node / GiB:.1f}"
    assert rows["lora", "2"][-2:] == ["no", "(host)"] and rows["lora", "3"][-1] == "yes"
    assert "does NOT fit" in out and "recommended: lora, ZeRO-3" in out
    with pytest.raises(SpecError, match="--host-memory"):
        parse_memory("lots", "--host-memory")
