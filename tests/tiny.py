"""Tiny models and data built in-process for tests: seeded, a few seconds, nothing downloaded."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

TOPICS = {
    "billing": ["invoice", "charge", "refund", "payment", "bill"],
    "shipping": ["parcel", "courier", "delivery", "tracking", "shipment"],
    "login": ["password", "account", "username", "signin", "locked"],
    "hardware": ["screen", "battery", "keyboard", "charger", "speaker"],
}
FILLER = ["my", "the", "is", "not", "please", "help", "with", "a", "today", "again", "why", "broken", "late"]


def write_tiny_model(folder: Path, seed: int = 0, pretrain_steps: int = 80) -> Path:
    """A 2-layer BERT (hidden 32) and a word-level tokenizer over the tiny vocabulary, saved as an HF folder.

    A random encoder gives LoRA almost nothing to adapt, so the encoder is first "pretrained" in full for a
    few steps on topic rows of another seed; only the encoder is saved (the job adds a fresh head).
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for ws in TOPICS.values() for w in ws} | set(FILLER))
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    model = BertForSequenceClassification(config.__class__(**{**config.to_dict(), "num_labels": len(TOPICS)}))
    rows = tiny_rows(256, seed=1000 + seed)
    batch = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    _pretrain(model, batch, torch.tensor([list(TOPICS).index(r["label"]) for r in rows]), pretrain_steps, 3e-3, seed)
    model.bert.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _pretrain(model, batch, labels, steps: int, lr: float, seed: int) -> None:
    """Full training for a few seeded steps on random 32-row picks of a tokenised batch."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(0, len(labels), (32,), generator=generator)
        model(input_ids=batch["input_ids"][pick], attention_mask=batch["attention_mask"][pick],
              labels=labels[pick]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def tiny_rows(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        topic = list(TOPICS)[i % len(TOPICS)]
        words = [rng.choice(TOPICS[topic]) for _ in range(2)] + rng.sample(FILLER, 4)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": topic})
    return rows


def write_tiny_data(folder: Path, train: int = 192, validation: int = 64, test: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (name, count) in enumerate((("train", train), ("validation", validation), ("test", test))):
        with open(folder / f"{name}.jsonl", "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in tiny_rows(count, seed))
    return folder


def tiny_job(root: Path, model_dir: Path, data_dir: Path, **sections) -> dict:
    """A job dict on the tiny model and data; keyword arguments replace or extend whole sections."""
    job = {
        "version": 1,
        "name": "tiny",
        "output_dir": str(root / "out"),
        "model": {"path": str(model_dir)},
        "data": {"train": str(data_dir / "train.jsonl"), "validation": str(data_dir / "validation.jsonl"),
                 "test": str(data_dir / "test.jsonl"), "max_length": 16},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "train": {"epochs": 3, "micro_batch_size": 16, "learning_rate": 0.01, "log_every_steps": 2},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2},
    }
    for key, value in sections.items():
        job[key] = {**job.get(key, {}), **value} if isinstance(value, dict) else value
    return job


def write_job(path: Path, job: dict) -> Path:
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


CHAT_TEMPLATE = (  # the ChatML shape SmolLM2 and Qwen use
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LM_WORDS = sorted({w for ws in TOPICS.values() for w in ws} | set(FILLER) | set(TOPICS) | {"topic", "about", "it",
                                                                                          "answer", "question", ":"})


def write_tiny_llama(folder: Path, seed: int = 0, pretrain_steps: int = 150) -> Path:
    """A 2-layer Llama-style model (hidden 32, grouped-query attention) with a word-level fast tokenizer that
    has special tokens, offsets and a ChatML chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + ["user", "assistant", "system"] + LM_WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="<|im_end|>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=vocab["<s>"], eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<pad>"],
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    # "Pretraining": full training on chats answered in another style ("it is about X"), so the model knows the
    # words and the turn structure; the LoRA jobs then teach the "topic : X" style on top.
    texts = [tokenizer.apply_chat_template([r["messages"][0], {"role": "assistant", "content": "it is about "
                                            + r["messages"][1]["content"].split()[-1]}], tokenize=False)
             for r in tiny_chat_rows(256, seed=1000 + seed)]
    batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    _pretrain(model, batch, labels, pretrain_steps, 1e-2, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_chat_rows(count: int, seed: int) -> list[dict]:
    """Chats whose assistant names the topic of the user's words: learnable in a few dozen steps."""
    rows = []
    for row in tiny_rows(count, seed):
        rows.append({"messages": [{"role": "user", "content": f"question : {row['text']}"},
                                  {"role": "assistant", "content": f"topic : {row['label']}"}]})
    return rows


def write_tiny_lm_data(folder: Path, kind: str = "chat", train: int = 128, validation: int = 32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (name, count) in enumerate((("train", train), ("validation", validation))):
        rows = tiny_chat_rows(count, seed)
        if kind == "prompt_completion":
            rows = [{"prompt": r["messages"][0]["content"] + " answer :",
                     "completion": " " + r["messages"][1]["content"]} for r in rows]
        elif kind == "text":
            rows = [{"text": r["messages"][0]["content"] + " " + r["messages"][1]["content"]} for r in rows]
        with open(folder / f"{name}.jsonl", "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    return folder


def tiny_lm_job(root: Path, model_dir: Path, data_dir: Path, **sections) -> dict:
    job = tiny_job(root, model_dir, data_dir, **sections)
    job["model"] = {"path": str(model_dir), "task": "causal_lm", **sections.get("model", {})}
    job["data"] = {"train": str(data_dir / "train.jsonl"), "validation": str(data_dir / "validation.jsonl"),
                   "max_length": 32, **sections.get("data", {})}
    job["lora"] = {"r": 4, "alpha": 8, "target_modules": "all-linear", **sections.get("lora", {})}
    return job


class MlflowServer:
    """A real `mlflow server` process (SQLite backend, local artifact root) on a fixed loopback port: it can be
    stopped and started again on the same store, as a tracking server that goes down and comes back."""

    def __init__(self, root: Path):
        import socket

        self.root = root
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._process = None

    def start(self) -> str:
        import subprocess
        import sys
        import time
        import urllib.request

        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
                   "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        with open(self.root / "server.log", "ab") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return self.url
            except OSError as error:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    log_text = (self.root / "server.log").read_text()[-2000:]
                    raise RuntimeError(f"mlflow server did not start: {log_text}") from error
                time.sleep(0.5)

    def stop(self) -> None:
        import os
        import signal

        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)  # the server and its uvicorn workers
            self._process.wait(timeout=30)
        self._process = None


def train_workers() -> list:
    """The Ray Train worker processes alive on this machine (what must not outlive a run)."""
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


def assert_racing_retrains_end_with_one_champion(world: dict, model: str, snapshots: tuple[str, str]) -> None:
    """Two ``orchestrator retrain`` processes on two snapshots of the same job at once (margin 0): both register,
    exactly one champion is in force and is the last promotion in its history, each promotion was compared against
    the champion in force when it held the lock, and no promotion lock is left behind. ``world``: the test
    module's registry world (``job``, ``ray``, ``client``)."""
    import json
    import os
    import subprocess
    import sys

    client = world["client"]

    def versions() -> list:
        return client.search_model_versions(f"name = '{model}'")

    before = {v.version for v in versions()}
    env = {**os.environ, "RAY_ADDRESS": world["ray"]}
    racers = [subprocess.Popen([sys.executable, "-m", "orchestrator", "retrain", world["job"],
                                f"retrain.data.snapshot={snapshot}", "retrain.margin=0.0"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for snapshot in snapshots]
    outputs = [racer.communicate(timeout=600)[0] for racer in racers]
    assert all(racer.returncode in (0, 3) for racer in racers), outputs
    after = versions()
    new = [v for v in after if v.version not in before]
    assert len(new) == 2 and {v.tags["orchestrator.snapshot"] for v in new} == set(snapshots)
    registered = client.get_registered_model(model)
    assert registered.aliases["champion"] in {v.version for v in after}
    history = json.loads(registered.tags["orchestrator.alias_history.champion"])
    assert history[-1] == registered.aliases["champion"]  # the last promotion is the one in force
    for version in [v for v in new if v.tags["orchestrator.decision"] == "promoted"]:
        # each promotion compared against the champion in force when it held the lock
        assert version.tags["orchestrator.champion.previous_version"] == version.tags["orchestrator.champion_version"]
    assert not [m for m in client.search_registered_models() if m.name.endswith(".promotion-lock")]


def start_two_ranks(script: str, *args: str) -> list:
    """Two plain processes running ``script`` (``python -c``) as ranks 0 and 1 of one process group: a free
    loopback port, MASTER_ADDR/MASTER_PORT, WORLD_SIZE 2, RANK and LOCAL_RANK set, the repository on PYTHONPATH."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": port, "WORLD_SIZE": "2"}
    return [subprocess.Popen([sys.executable, "-c", script, *args], env={**env, "RANK": r, "LOCAL_RANK": r},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ("0", "1")]


def refuse_the_launch(monkeypatch) -> None:
    """Makes connecting to (or starting) Ray, the first cluster step, fail with 'reached the launch': a test of a
    refusal before Ray then sees that text only if the refusal came too late."""
    from orchestrator.runtime import launcher
    from orchestrator.spec import SpecError

    def reached(*_args, **_kwargs):
        raise SpecError("reached the launch")

    monkeypatch.setattr(launcher, "connect", reached)
