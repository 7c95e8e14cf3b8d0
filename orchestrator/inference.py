"""Using a trained adapter in this process: find its base model, load both, generate.

An adapter this project saved carries ``orchestrator_job.yaml`` (the job that trained it, with the data format
resolved), so the base model and the prompt format are known; ``--base`` overrides the base for adapters from
elsewhere (PEFT's ``base_model_name_or_path`` is the fallback).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from orchestrator.spec import ModelSpec, SpecError


@dataclass(frozen=True)
class LoadedAdapter:
    folder: str
    model: object  # peft.PeftModel, in eval mode
    tokenizer: object
    chat: bool  # trained on chat data: prompts are wrapped in the chat template


def adapter_folder(reference: str, tracking_uri: str | None) -> str:
    """A local folder for a folder path or a registry URI (models:/NAME@alias, downloaded once into the cache)."""
    from orchestrator import registry

    if registry.is_registry_ref(reference):
        uri = registry.registry_uri(tracking_uri)
        store = hashlib.sha256(uri.encode()).hexdigest()[:12]  # NAME-vN is unique within one registry only
        cache = Path(os.environ.get("ORCHESTRATOR_CACHE", Path.home() / ".cache" / "orchestrator"), "adapters", store)
        return registry.resolve_adapter(reference, uri, str(cache))
    if not Path(reference, "adapter_config.json").is_file():
        raise SpecError(f"--adapter: {reference} is not a PEFT adapter folder (no adapter_config.json) and not a "
                        "registry URI (models:/NAME@alias or models:/NAME/VERSION)")
    return reference


def base_model_spec(folder: str, base: str | None) -> ModelSpec:
    """The base the adapter was trained on, as a :class:`ModelSpec`."""
    saved = Path(folder, "orchestrator_job.yaml")
    if base:
        return ModelSpec(path=base, task="causal_lm")
    if saved.is_file():
        model = yaml.safe_load(saved.read_text())["model"]
        return ModelSpec(path=model["path"], gguf_file=model.get("gguf_file"), task=model.get("task", "causal_lm"),
                         trust_remote_code=model.get("trust_remote_code", False))
    recorded = json.loads(Path(folder, "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not recorded:
        raise SpecError(f"--base: {folder} does not say which base model it adapts; pass --base MODEL_FOLDER")
    return ModelSpec(path=recorded, task="causal_lm")


def load_causal_adapter(reference: str, base: str | None = None, tracking_uri: str | None = None) -> LoadedAdapter:
    """Loads base + adapter for generation.

    Raises:
        SpecError: an adapter that is not a causal LM adapter, or a base that does not fit it.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.modeling import check_adapter_task, model_folder

    folder = adapter_folder(reference, tracking_uri)
    try:
        check_adapter_task(folder, "CAUSAL_LM")
    except SpecError as error:
        raise SpecError(str(error).replace("model.adapter", "--adapter").replace("this job", "generate")) from None
    model_spec = base_model_spec(folder, base)
    base_model = AutoModelForCausalLM.from_pretrained(model_folder(model_spec), use_safetensors=True,
                                                      trust_remote_code=model_spec.trust_remote_code)
    try:
        model = PeftModel.from_pretrained(base_model, folder).eval()
    except (RuntimeError, ValueError, KeyError) as error:  # shapes or module names do not match
        raise SpecError(f"--adapter: {folder} does not fit the base {model_spec.path}: {str(error)[:300]}; "
                        "pass --base with the model it was trained on") from None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    saved = Path(folder, "orchestrator_job.yaml")
    fmt = yaml.safe_load(saved.read_text()).get("data", {}).get("format") if saved.is_file() else None
    chat = fmt == "chat" and bool(getattr(tokenizer, "chat_template", None))
    return LoadedAdapter(folder, model, tokenizer, chat)


def complete(loaded: LoadedAdapter, prompt: str, max_new_tokens: int, raw: bool = False) -> str:
    """A greedy completion; the prompt goes through the chat template when the adapter was trained on chats."""
    from orchestrator.lm_data import _chat
    from orchestrator.tasks import generate

    chat = loaded.chat and not raw
    text = _chat(loaded.tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True) if chat \
        else prompt
    if loaded.tokenizer.pad_token_id is None:
        loaded.tokenizer.pad_token = loaded.tokenizer.eos_token
    return generate(loaded.model, loaded.tokenizer, [text], max_new_tokens, add_special_tokens=not chat)[0]
