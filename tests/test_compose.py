"""`compose`, by invariant: `cat` (and `svd` at full rank) is exactly the weighted sum of the adapters' updates;
every method writes a plain PEFT adapter; two adapters taught different tasks keep each task's gain when
composed (measured before and after on each task's own validation data); a composition can be registered and
used by URI; what cannot be composed is refused with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.cli import EXIT_BAD_INPUT, main
from orchestrator.serve.evaluation import evaluate_file
from orchestrator.serve.inference import load_adapter
from orchestrator.spec import spec_from_dict
from orchestrator.train.loop import train_worker
from orchestrator.train.session import LocalContext
from tests.tiny import tiny_job, tiny_lm_job


def _train_task(root: Path, tiny_llama: Path, tiny_chats: Path, rewrite, r: int = 4) -> Path:
    """A LoRA adapter on the tiny Llama taught the chats rewritten by ``rewrite(prompt, label) -> (prompt,
    answer)``; its data folder is ``root``."""
    for split in ("train", "validation"):
        rows = [json.loads(line) for line in (tiny_chats / f"{split}.jsonl").read_text().splitlines()]
        for row in rows:
            user, assistant = row["messages"]
            user["content"], assistant["content"] = rewrite(user["content"], assistant["content"].split()[-1])
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = spec_from_dict(tiny_lm_job(root, tiny_llama, root, scaling={"num_workers": 1}, lora={"r": r, "alpha": 2 * r},
                                      train={"epochs": 2, "learning_rate": 0.02}, generation={"num_prompts": 0}))
    train_worker(spec, LocalContext(str(root / "ckpt")), None, None)
    return Path(spec.output_dir, "adapter")


@pytest.fixture(scope="module")
def tasks(tiny_llama, tiny_chats, tmp_path_factory) -> dict[str, Path]:
    """Two tasks on different prompts: "question : WORDS" -> "topic : LABEL" and "answer : WORDS" -> "LABEL LABEL"."""
    topic = tmp_path_factory.mktemp("task-topic")
    twice = tmp_path_factory.mktemp("task-twice")
    return {"topic": _train_task(topic, tiny_llama, tiny_chats, lambda p, label: (p, f"topic : {label}")),
            "twice": _train_task(twice, tiny_llama, tiny_chats,
                                 lambda p, label: (p.replace("question", "answer"), f"{label} {label}"))}


def _loss(adapter: Path | str, task: Path) -> float:
    return evaluate_file(load_adapter(str(adapter)), str(task.parent.parent / "validation.jsonl"))["loss"]


def _base_loss(adapter: Path, task: Path) -> float:
    loaded = load_adapter(str(adapter))
    with loaded.model.disable_adapter():
        return evaluate_file(loaded, str(task.parent.parent / "validation.jsonl"))["loss"]


def _deltas(folder: Path | str) -> dict[str, torch.Tensor]:
    """Every adapted module's update s·B·A, from the saved adapter."""
    model = load_adapter(str(folder)).model
    return {name: module.get_delta_weight(module.active_adapters[0]).detach()
            for name, module in model.named_modules() if hasattr(module, "get_delta_weight") and module.lora_A}


def test_cat_and_full_rank_svd_are_the_exact_weighted_sum(tasks, tmp_path):
    a, b = _deltas(tasks["topic"]), _deltas(tasks["twice"])
    assert main(["compose", "--adapter", str(tasks["topic"]), "--adapter", str(tasks["twice"]), "--weights", "0.7,-0.4",
                 "--method", "cat", "--out", str(tmp_path / "cat")]) == 0
    assert main(["compose", "--adapter", str(tasks["topic"]), "--adapter", str(tasks["twice"]), "--weights", "0.7,-0.4",
                 "--method", "svd", "--svd-rank", "8", "--out", str(tmp_path / "svd")]) == 0
    assert json.loads((tmp_path / "cat" / "adapter_config.json").read_text())["r"] == 8  # 4 + 4
    for method in ("cat", "svd"):
        combined = _deltas(tmp_path / method)
        assert combined.keys() == a.keys() and len(a) == 14  # 7 linear layers x 2 blocks
        worst = max(float((combined[k] - (0.7 * a[k] - 0.4 * b[k])).abs().max()) for k in a)
        assert worst < 1e-5, (method, worst)
        assert max(float(v.abs().max()) for v in a.values()) > 1e-2  # the updates are not ~0: not vacuous


def test_two_tasks_composed_keep_each_tasks_quality(tasks, tmp_path, capsys):
    """Each task's validation loss: base, its own adapter, the other task's adapter, and compositions."""
    table = {}
    for task, adapter in tasks.items():
        table[task] = {"base": _base_loss(adapter, adapter), **{name: _loss(other, adapter)
                                                                for name, other in tasks.items()}}
    methods = {"cat 1,1": ("cat", "1,1"), "svd 1,1": ("svd", "1,1"), "linear 0.5,0.5": ("linear", "0.5,0.5"),
               "ties 1,1": ("ties", "1,1"), "dare 1,1": ("dare", "1,1")}
    for label, (method, weights) in methods.items():
        out = tmp_path / method
        assert main(["compose", "--adapter", str(tasks["topic"]), "--adapter", str(tasks["twice"]), "--method",
                     method, "--weights", weights, "--out", str(out)]) == 0
        for task, adapter in tasks.items():
            table[task][label] = _loss(out, adapter)
    with capsys.disabled():
        print("\nvalidation loss per task (rows) of each adapter (columns)")
        for task, row in table.items():
            print(f"  {task:<6} " + "  ".join(f"{name} {loss:.3f}" for name, loss in row.items()))

    for task, row in table.items():
        other = "twice" if task == "topic" else "topic"
        assert row[task] < 0.3 * row["base"]  # each adapter learned its task ...
        assert row[other] > 2 * row[task]  # ... and not the other one: two different tasks
        gain = row["base"] - row[task]
        # Summing the updates keeps most of each task's gain; the tasks share the same weights, so some loss.
        assert row["base"] - row["cat 1,1"] > 0.75 * gain, (task, row)  # measured: 83% and 95%
        for label in ("svd 1,1", "linear 0.5,0.5", "ties 1,1", "dare 1,1"):
            assert row[label] < row["base"], (task, label, row)  # the rougher methods still help every task


def test_a_composition_registers_and_serves_by_uri(tasks, tmp_path, capsys):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/registry.db"
    assert main(["compose", "--adapter", str(tasks["topic"]), "--adapter", str(tasks["twice"]), "--weights", "1,1",
                 "--out", str(tmp_path / "both"), "--register", "both-tasks", "--tracking-uri", uri]) == 0
    assert "registered: both-tasks version 1" in capsys.readouterr().out
    client = MlflowClient(uri)
    version = client.get_model_version("both-tasks", "1")
    assert version.tags["orchestrator.compose_method"] == "cat"
    assert json.loads(version.tags["orchestrator.composed_from"]) == [str(tasks["topic"]), str(tasks["twice"])]
    assert client.get_run(version.run_id).info.status == "FINISHED"
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts beside the SQLite file, not in the working directory

    prompts = ["question : my invoice late", "answer : my invoice late"]
    assert main(["generate", "--adapter", "models:/both-tasks/1", "--tracking-uri", uri, "--max-new-tokens", "3",
                 *prompts]) == 0
    from_registry = capsys.readouterr().out.strip().splitlines()
    assert main(["generate", "--adapter", str(tmp_path / "both"), "--max-new-tokens", "3", *prompts]) == 0
    assert capsys.readouterr().out.strip().splitlines() == from_registry and len(from_registry) == 2


def test_refusals_write_nothing(tasks, tiny_model, tiny_data, tiny_llama, tiny_chats, tmp_path, capsys):
    topic, twice = str(tasks["topic"]), str(tasks["twice"])
    (tmp_path / "wide").mkdir()
    wide = _train_task(tmp_path / "wide", tiny_llama, tiny_chats, lambda p, label: (p, f"topic : {label}"), r=2)
    classifier_root = tmp_path / "classifier"
    spec = spec_from_dict(tiny_job(classifier_root, tiny_model, tiny_data, scaling={"num_workers": 1},
                                   train={"epochs": 1}))
    train_worker(spec, LocalContext(str(classifier_root / "ckpt")), None, None)
    classifier = str(Path(spec.output_dir, "adapter"))
    cases = [
        (["--adapter", topic], "at least two"),
        (["--adapter", topic, "--adapter", twice, "--weights", "1"], "2 adapters"),
        (["--adapter", topic, "--adapter", twice, "--weights", "a,b"], "--weights"),
        (["--adapter", topic, "--adapter", twice, "--method", "average"], "--method"),
        (["--adapter", topic, "--adapter", twice, "--method", "ties", "--density", "1.5"], "--density"),
        (["--adapter", topic, "--adapter", twice, "--method", "cat", "--density", "0.5"], "--density"),
        (["--adapter", topic, "--adapter", str(wide), "--method", "linear"], "equal rank"),
        (["--adapter", topic, "--adapter", classifier], "classifier"),
        (["--adapter", topic, "--adapter", str(tmp_path)], "not a PEFT adapter"),
        (["--adapter", topic, "--adapter", twice, "--register", "../escape"], "--register"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for arguments, message in cases:
        assert main(["compose", *arguments, "--out", str(tmp_path / "composed")]) == EXIT_BAD_INPUT, arguments
        assert message in capsys.readouterr().err, arguments
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no partial folder
