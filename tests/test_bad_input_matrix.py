"""Issue 8, point 5: a table of malformed inputs. Each must exit 2 with one message naming the field or file
(and how to fix it), before any Ray step, leaving nothing that looks finished and no registry entry; and a
fuzz of the spec loader: random nested YAML gives our validation error, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from orchestrator.cli import EXIT_BAD_INPUT, main
from orchestrator.spec import SpecError, load_spec
from tests.tiny import write_job

ROWS = [{"text": "my invoice is late", "label": "billing"}, {"text": "my parcel is late", "label": "shipping"}] * 4


def _rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _raw(path: Path, content: bytes) -> str:
    path.write_bytes(content)
    return str(path)


def cases(tmp: Path, model: Path) -> dict[str, tuple[object, str]]:
    """name -> (job sections to merge in, or raw YAML text for the whole file; text the message must hold)."""
    no_tokenizer = tmp / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((model / "config.json").read_text())
    adapter = tmp / "other-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "SEQ_CLS"}))
    (adapter / "labels.json").write_text(json.dumps(["a", "b", "c"]))
    return {
        # YAML that is not a job
        "unclosed bracket": ("version: 1\nmodel: {path: x\n", "not valid YAML"),
        "bad indentation": ("version: 1\nmodel:\n  path: x\n task: y\n", "not valid YAML"),
        "a list, not a mapping": ("- version: 1\n- name: x\n", "a job file is a mapping"),
        "empty file": ("", "a job file is a mapping"),
        "not UTF-8": (b"version: 1\nname: caf\xe9\n", "not UTF-8"),
        "no version": ("name: x\n", "version: must be 1"),
        # wrong types
        "rank as a word": ({"lora": {"r": "eight"}}, "lora.r"),
        "learning rate as a word": ({"train": {"learning_rate": "fast"}}, "train.learning_rate"),
        "fractional workers": ({"scaling": {"num_workers": 1.5}}, "scaling.num_workers"),
        "max_length as a list": ({"data": {"max_length": [1]}}, "data.max_length"),
        "model as a string": ({"model": "pkg:x"}, "model"),
        "targets as a number": ({"lora": {"target_modules": 3}}, "lora.target_modules"),
        # unknown keys at every level
        **{f"unknown key in {section}": ({section: {"zzz_unknown": 1}}, f"{section}.zzz_unknown: unknown key")
           for section in ("model", "data", "lora", "train", "deepspeed", "scaling", "tracking", "registry",
                           "method", "generation")},
        "unknown top-level key": ({"zzz_unknown": 1}, "zzz_unknown: unknown key"),
        "unknown key in tune": ({"tune": {"space": {"lora.r": {"grid": [2, 4]}}, "zzz_unknown": 1}},
                                "tune.zzz_unknown: unknown key"),
        # out of range
        "dropout above 1": ({"lora": {"dropout": 1.5}}, "lora.dropout"),
        "warmup ratio 1": ({"train": {"warmup_ratio": 1}}, "train.warmup_ratio"),
        "ZeRO stage 5": ({"deepspeed": {"zero_stage": 5}}, "deepspeed.zero_stage"),
        "alpha zero": ({"lora": {"alpha": 0}}, "lora.alpha"),
        "negative max_failures": ({"scaling": {"max_failures": -2}}, "scaling.max_failures"),
        # conflicting options
        "4-bit base offloaded to CPU": ({"method": {"name": "qlora"}, "scaling": {"use_gpu": True},
                                         "deepspeed": {"zero_stage": 3, "offload_params": True}},
                                        "deepspeed.offload_params"),
        "fp16 on a CPU cluster": ({"train": {"precision": "fp16"}}, "train.precision"),
        "parameter offload without ZeRO-3": ({"deepspeed": {"offload_params": True}}, "deepspeed.offload_params"),
        "epochs and max_steps": ({"train": {"epochs": 1, "max_steps": 3}}, "train.epochs"),
        "validation file and split": ({"data": {"validation_split": 0.2}}, "data.validation_split"),
        # data files
        "missing data file": ({"data": {"train": str(tmp / "absent.jsonl")}}, "absent.jsonl does not exist"),
        "empty data file": ({"data": {"train": _raw(tmp / "empty.jsonl", b"")}}, "data.train"),
        "data not UTF-8": ({"data": {"train": _raw(tmp / "latin1.csv", "text,label\ncaf\xe9,a\n".encode("latin-1"))}},
                           "not UTF-8"),
        "truncated JSONL": ({"data": {"train": _raw(tmp / "cut.jsonl", (json.dumps(ROWS[0]) + "\n" +
                                                                          json.dumps(ROWS[1])[:20]).encode())}},
                            "cut.jsonl"),
        "missing text column": ({"data": {"text_column": "utterance"}}, "data.text_column"),
        "missing label column": ({"data": {"label_column": "intent"}}, "data.label_column"),
        "empty text": ({"data": {"train": _rows(tmp / "blank.jsonl", ROWS + [{"text": "", "label": "billing"}])}},
                       "blank.jsonl"),
        "label missing": ({"data": {"train": _rows(tmp / "nolabel.jsonl", ROWS + [{"text": "hi", "label": None}])}},
                          "nolabel.jsonl"),
        "unknown file type": ({"data": {"train": _rows(tmp / "train.xml", ROWS)}}, "unknown format"),
        # models and adapters
        "model folder without config": ({"model": {"path": str(tmp)}}, "config.json"),
        "model folder without tokenizer": ({"model": {"path": str(no_tokenizer)}}, "tokenizer"),
        "adapter for other labels": ({"model": {"adapter": str(adapter)}}, "model.adapter"),
        # registry names
        "registry name with ../": ({"registry": {"name": "../escape"}}, "registry.name"),
        "registry name with a slash": ({"registry": {"name": "team/model"}}, "registry.name"),
    }


def test_each_malformed_input_is_refused_with_its_field_and_nothing_left(tmp_path, job, tiny_model, capsys,
                                                                          monkeypatch):
    from orchestrator.runtime import launcher

    def reached(*_args, **_kwargs):
        raise SpecError("a Ray step was reached")

    monkeypatch.setattr(launcher, "connect", reached)
    table = cases(tmp_path, tiny_model)
    assert len(table) >= 40
    failures = []
    for name, (content, expected) in table.items():
        path = tmp_path / f"{name.replace(' ', '_').replace('/', '_')}.yaml"
        if isinstance(content, dict):
            raw = job(**content) if all(k in ("model", "data", "lora", "train", "deepspeed", "scaling", "tracking",
                                              "registry", "method", "generation", "tune") for k in content) \
                else {**job(), **content}
            write_job(path, raw)
            output = Path(raw["output_dir"])
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
            output = tmp_path / "out"
        code = main(["train", str(path)])
        message = capsys.readouterr().err
        ok = code == EXIT_BAD_INPUT and message.startswith("error: ") and expected in message \
            and "Traceback" not in message and not output.exists()
        if not ok:
            failures.append(f"{name}: exit {code}, message {message[:300]!r}")
    assert not failures, "\n".join(failures)


def test_random_nested_yaml_gives_our_error_never_a_traceback(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    leaves = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                       st.text(max_size=12))
    keys = st.sampled_from(["version", "name", "model", "data", "lora", "train", "deepspeed", "scaling", "tune",
                            "path", "r", "epochs", "zero_stage", "space", "grid", "task", "output_dir", "x"])
    trees = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(keys, inner, max_size=6)), max_leaves=30)
    documents = st.one_of(trees, st.dictionaries(keys, trees, max_size=8).map(lambda d: {"version": 1, **d}))

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(documents)
    def check(document):
        path = tmp_path / "fuzz.yaml"
        path.write_text(yaml.safe_dump(document))
        try:
            load_spec(path)
        except SpecError:
            pass  # ours: the field named, no traceback

    check()
