"""The memory planner, by invariant: the published anchors (16 bytes per trainable parameter under mixed-precision
Adam; the LoRA paper's trainable count), what each ZeRO stage shards (and that stages 1-2 leave a frozen base
whole), activations that scale as the formula says, recommendations that fit, predictions within 25% of peak
memory measured on this machine, and the preflight refusal with its override."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import EXIT_BAD_INPUT, main
from orchestrator.plan import fitting, memory
from orchestrator.plan.fitting import Budget
from orchestrator.plan.memory import GiB, Setting, estimate
from orchestrator.spec import SpecError, spec_from_dict
from orchestrator.train.shape import model_shape
from tests.conftest import REPO
from tests.tiny import refuse_the_launch, tiny_job, write_job

LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
             "tie_word_embeddings": False, "rms_norm_eps": 1e-5}


@pytest.fixture(scope="module")
def llama7b(tmp_path_factory) -> Path:
    """Llama-2-7B's config alone: no weights exist, the planner must not need them."""
    folder = tmp_path_factory.mktemp("llama7b")
    (folder / "config.json").write_text(json.dumps(LLAMA2_7B))
    return folder


def _spec(folder: Path, **sections) -> object:
    job = {"version": 1, "name": "plan", "output_dir": "/tmp/unused", "model": {"path": str(folder),
                                                                               "task": "causal_lm"},
           "data": {"train": "/tmp/unused.jsonl", "validation_split": 0.1, "max_length": 512},
           "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
           "train": {"epochs": 1, "micro_batch_size": 4, "precision": "bf16"}, "scaling": {"num_workers": 8}}
    for key, value in sections.items():
        job[key] = {**job.get(key, {}), **value}
    return spec_from_dict(job)


def test_full_fine_tuning_of_a_7b_model_costs_16_bytes_per_parameter(llama7b):
    spec = _spec(llama7b)
    shape = model_shape(spec, None)
    assert shape.total_params == 6_738_415_616  # Llama-2-7B, counted on the meta device
    full = estimate(shape, Setting("full", 0, 4, False), world=8, seq_len=512, precision="bf16")
    assert full.model_states == 16 * shape.total_params  # 2 weights + 2 grads + 12 fp32 master/m/v
    assert 105e9 < full.model_states < 112e9  # "about 112 GB for 7B": 6.74B x 16 bytes = 107.8 GB


def test_lora_counts_what_the_lora_paper_counts_and_the_frozen_base_stays_whole_until_zero3(llama7b):
    spec = _spec(llama7b)
    shape = model_shape(spec, None)
    assert shape.lora_trainable == 32 * 2 * 8 * (4096 + 4096)  # q, v at r=8: 4.19M, as in Hu et al.
    by_stage = {s: estimate(shape, Setting("lora", s, 4, False), world=8, seq_len=512, precision="bf16")
                for s in range(4)}
    base = 2 * shape.total_params  # bf16
    for stage in (0, 1, 2):
        assert by_stage[stage].weights == base + 2 * shape.lora_trainable  # every device holds the whole base
    assert by_stage[3].weights == pytest.approx((base + 2 * shape.lora_trainable) / 8)  # only ZeRO-3 shards it
    t = shape.lora_trainable
    assert by_stage[0].optimizer == 12 * t and by_stage[1].optimizer == 12 * t / 8  # ZeRO-1: optimizer states
    assert by_stage[1].gradients == 2 * t and by_stage[2].gradients == 2 * t / 8  # ZeRO-2: gradients too
    full = estimate(shape, Setting("full", 0, 4, False), world=8, seq_len=512, precision="bf16")
    assert full.model_states / by_stage[0].model_states > 7  # LoRA: ~2 bytes/param instead of 16
    qlora = estimate(shape, Setting("qlora", 0, 4, False), world=8, seq_len=512, precision="bf16")
    assert 3.3e9 < qlora.weights < 4.2e9  # ~0.52 bytes per block weight + bf16 embeddings and head


def test_activations_follow_batch_length_and_checkpointing(llama7b):
    spec = _spec(llama7b)
    shape = model_shape(spec, None)

    def activations(batch: int, seq: int, checkpointing: bool = False) -> float:
        return estimate(shape, Setting("lora", 2, batch, checkpointing), world=8, seq_len=seq,
                        precision="bf16").activations

    assert activations(8, 512) == pytest.approx(2 * activations(4, 512))  # no s^2 term with SDPA, no dropout
    assert activations(4, 1024) == pytest.approx(2 * activations(4, 512))
    assert activations(4, 512, True) < activations(4, 512) / 5  # 32 layers: keep inputs, recompute one
    eager = estimate(shape, Setting("lora", 2, 4, False), world=8, seq_len=1024, precision="bf16",
                     eager_attention=True).activations
    # (2x2+1) bytes x b x heads x s^2 in each of the 32 layers and the backward's working one
    assert eager - activations(4, 1024) == pytest.approx(33 * 5 * 4 * 32 * 1024**2)


def test_recommendations_fit_and_nothing_fitting_is_said(llama7b):
    spec = _spec(llama7b, scaling={"num_workers": 8, "use_gpu": True})
    shape = model_shape(spec, None)
    as_is = memory.estimate_job(spec, shape, memory.job_setting(spec))
    best = fitting.recommend(spec, shape, Budget(24 * GiB)).device
    assert as_is.total > 24 * GiB and best is not None and best.total <= 24 * GiB
    assert best.setting.micro_batch <= spec.train.micro_batch_size
    changes = memory.overrides(spec, best.setting)
    assert changes and all("=" in c for c in changes)
    assert fitting.recommend(spec, shape, Budget(2 * GiB)) is None
    lines = "\n".join(fitting.plan_table(spec, shape, Budget(2 * GiB)))
    assert "nothing fits 2.0 GiB" in lines and "QLoRA" in lines
    with pytest.raises(SpecError, match=r"needs about .* GiB per worker .* has 2.0 GiB"):
        fitting.check_fits(spec, shape, Budget(2 * GiB, device_where="scaling.device_memory_gb"))
    assert memory.parse_memory("80GiB") == 80 * GiB and memory.parse_memory("80GB") == 80e9
    with pytest.raises(SpecError, match="--device-memory"):
        memory.parse_memory("lots")


def test_plan_prints_every_method_at_every_stage(llama7b, tmp_path, capsys):
    job = _spec(llama7b).model_dump()
    assert main(["plan", str(write_job(tmp_path / "job.yaml", job)), "--device-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["full"], ["lora"], ["qlora"])]
    assert [(r[0], r[1]) for r in rows] == [(m, str(s)) for m in ("full", "lora", "qlora") for s in range(4)]
    assert "needs a CUDA GPU" in out  # a CPU job: QLoRA is listed, and why it cannot run here
    assert "as specified" in out


@pytest.mark.parametrize("model,checkpointing", [("minilm", False), ("llama", False)])
def test_prediction_is_within_25_percent_of_measured_peak(model, checkpointing, tmp_path):
    """A fresh process runs the real loop (DeepSpeed, CPU) and measures what training adds to its memory."""
    out = tmp_path / "probe.json"
    subprocess.run([sys.executable, "-m", "tests.memory_probe", "--model", model, "--micro-batch", "16", "--seq",
                    "128", "--root", str(tmp_path), "--out", str(out), *(["--checkpointing"] * checkpointing)],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    ratio = result["predicted_mb"] / result["measured_mb"]
    print(f"{model} checkpointing={checkpointing}: predicted {result['predicted_mb']:.0f} MiB, measured "
          f"{result['measured_mb']:.0f} MiB, ratio {ratio:.3f}")
    assert 0.75 <= ratio <= 1.25, result


def test_the_plan_counts_evaluation_and_it_stays_under_training_at_a_128k_vocabulary(tmp_path):
    llama3 = {**LLAMA2_7B, "vocab_size": 128256, "num_key_value_heads": 8, "intermediate_size": 14336}
    (tmp_path / "config.json").write_text(json.dumps(llama3))  # Llama-3-8B
    spec = _spec(tmp_path, data={"max_length": 4096}, train={"micro_batch_size": 8})
    found = memory.estimate_job(spec, model_shape(spec, None), memory.job_setting(spec))
    logits = 8 * 4096 * 128256 * 2  # one evaluation micro-batch's bf16 logits: 8.4 GB
    # with a float32 copy of them (16.8 GB more) it would be over 3x that; one layer's MLP and a loss chunk add
    assert logits <= found.evaluation < 2 * logits
    assert found.evaluation < found.activations and found.total == found.training + found.runtime
    tight = memory.estimate(model_shape(spec, None), memory.job_setting(spec), world=8, seq_len=4096,
                            precision="bf16", dtype="bfloat16")
    assert tight.evaluation == found.evaluation
    no_head = memory.Estimate(**{**tight.__dict__, "activations": 0.0})  # evaluation then sets the peak
    assert no_head.total == pytest.approx(no_head.training + no_head.evaluation + no_head.runtime)


def test_evaluation_at_a_128k_vocabulary_peaks_below_the_training_step(tmp_path):
    """Evaluation's memory does not grow with the vocabulary: a Llama-style model with Llama-3's 128,256-word
    output layer, where one micro-batch's logits are 4 x 128 x 128k floats (251 MiB). The loss is taken in
    chunks (no full float32 copy and log-softmax), at the training micro-batch: the evaluation's peak stays
    under the training step's (which holds the logits, their log-softmax and their gradient)."""
    out = tmp_path / "probe.json"
    subprocess.run([sys.executable, "-m", "tests.memory_probe", "--model", "llama", "--micro-batch", "4", "--seq",
                    "128", "--vocab", "128256", "--root", str(tmp_path), "--out", str(out)],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    print(f"128k vocabulary: training step peak {result['peak_memory_mb']:.0f} MiB, evaluation peak "
          f"{result['peak_eval_memory_mb']:.0f} MiB")
    assert 0 < result["peak_eval_memory_mb"] <= result["peak_memory_mb"], result


def test_the_loss_taken_in_chunks_is_the_whole_loss():
    import torch

    from orchestrator.train.tasks import lm_eval_rows

    torch.manual_seed(0)
    logits = torch.randn(3, 17, 50, dtype=torch.bfloat16)
    labels = torch.randint(0, 50, (3, 17))
    labels[0, :5] = -100  # a prompt's tokens carry no loss
    batch = {"labels": labels}
    whole = lm_eval_rows(logits, batch, chunk_elements=10**9)
    for chunk in (1, 3 * 50, 3 * 50 * 7):  # one position at a time, one per chunk, seven per chunk
        for (nll, count), (expected, expected_count) in zip(lm_eval_rows(logits, batch, chunk), whole, strict=True):
            assert count == expected_count and nll == pytest.approx(expected, rel=1e-6)
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                                                  ignore_index=-100, reduction="sum")
    assert sum(nll for nll, _ in whole) == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize("scaling,expected", [
    ({"device_memory_gb": 0.25}, ["memory: the job needs about 1.0 GiB per worker", "0.2 GiB"]),
    # host RAM per node (issue 20): the node's numbers, not the device's
    ({"host_memory_gb": 1.5}, ["GiB of host memory per node (2 workers x (loading",
                               "scaling.host_memory_gb has 1.5 GiB"]),
], ids=["device", "host"])
def test_train_refuses_a_job_that_does_not_fit_before_ray_starts(tiny_model, tiny_data, tmp_path, capsys,
                                                                 monkeypatch, scaling, expected):
    refuse_the_launch(monkeypatch)
    job = write_job(tmp_path / "job.yaml", tiny_job(tmp_path, tiny_model, tiny_data,
                                                    scaling={"num_workers": 2, **scaling}))
    assert main(["train", str(job)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert all(text in err for text in expected), err
    if "host_memory_gb" in scaling:
        assert "GiB per worker" not in err
    assert "--skip-memory-check" in err and "reached the launch" not in err  # refused before any Ray step
    assert not (tmp_path / "out").exists()
    assert main(["train", str(job), "--skip-memory-check"]) == EXIT_BAD_INPUT  # the override: past the check
    assert "reached the launch" in capsys.readouterr().err


def test_the_cluster_tells_a_cpu_workers_share_of_memory(ray_cluster, tiny_model, tiny_data, tmp_path):
    from orchestrator.runtime import launcher

    spec = spec_from_dict(tiny_job(tmp_path, tiny_model, tiny_data, scaling={"num_workers": 2}))
    available, where = launcher.device_memory(spec, launcher.cluster_nodes())
    total = memory.parse_memory(f"{Path('/proc/meminfo').read_text().split()[1]}KiB")
    assert 0.05 * total < available <= total / 2 and "node" in where
