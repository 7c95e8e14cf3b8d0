"""``orchestrator compose``: several LoRA adapters on one base combined into one new adapter (PEFT's
``add_weighted_adapter``), saved in plain PEFT format and optionally registered.

What the methods do to the per-module updates ΔW_i = s_i·B_i·A_i (s = alpha/r) with weights w_i:

- ``cat``: concatenates the factors; ΔW = Σ w_i ΔW_i exactly, rank Σ r_i.
- ``svd``: ΔW = Σ w_i ΔW_i, truncated by SVD to ``svd_rank`` (default: the largest r); exact when
  ``svd_rank`` ≥ Σ r_i.
- ``linear``: sums the A and the B factors separately (each scaled by √(w_i·s_i)); cheap, rank r, but the cross
  terms B_i·A_j make it only an approximation of Σ w_i ΔW_i. Equal ranks needed.
- ``ties`` / ``dare_linear`` (alias ``dare``) / ``dare_ties`` / ``magnitude_prune``: prune each adapter's
  factors to ``density`` (by magnitude, or DARE's random drop and rescale), resolve sign conflicts (TIES), then
  sum; the ``*_svd`` variants apply the same to the ΔW_i and truncate by SVD. Equal ranks needed for the
  non-SVD ones. DARE's drop is random: ``seed`` makes it repeatable.

Classifier adapters are refused: each carries its own trained head (PEFT ``modules_to_save``), which no
weighted combination of LoRA factors can merge.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from orchestrator.serve.inference import add_adapters, check_new_folder, load_adapter, new_folder
from orchestrator.spec import SpecError
from orchestrator.train.modeling import JOB_FILE

METHODS = {"linear": "linear", "cat": "cat", "svd": "svd", "ties": "ties", "ties_svd": "ties_svd",
           "dare": "dare_linear", "dare_linear": "dare_linear", "dare_ties": "dare_ties",
           "dare_linear_svd": "dare_linear_svd", "dare_ties_svd": "dare_ties_svd",
           "magnitude_prune": "magnitude_prune", "magnitude_prune_svd": "magnitude_prune_svd"}
PRUNING = ("ties", "dare", "magnitude_prune")  # methods whose name contains one of these take a density
EQUAL_RANKS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
COMPOSED = "composed"
COMPOSITION_FILE = "composition.json"


@dataclass(frozen=True)
class Composition:
    folder: str
    method: str  # PEFT's combination_type
    rank: int
    trainable: int  # parameters in the new adapter


def parse_weights(text: str | None, count: int) -> list[float]:
    """``--weights 0.5,0.5``; default: an equal share each (1/n), the average of the adapters."""
    if text is None:
        return [1.0 / count] * count
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise SpecError(f"--weights: '{text}' is not a comma-separated list of numbers, e.g. 0.5,0.5") from None
    if len(weights) != count:
        raise SpecError(f"--weights: {len(weights)} weights for {count} adapters; give one per --adapter")
    if not all(abs(w) < 1e6 for w in weights) or not any(weights):
        raise SpecError(f"--weights: {text} must be finite and not all zero")
    return weights


def compose(references: list[str], weights: list[float], method: str, out: str, *, density: float | None = None,
            svd_rank: int | None = None, seed: int = 0, base: str | None = None,
            tracking_uri: str | None = None) -> Composition:
    """Loads the adapters on their shared base, combines them and writes a PEFT adapter folder at ``out``
    (beside it first, then renamed: ``out`` is complete or absent).

    Raises:
        SpecError: fewer than two adapters, an unknown method, a density or rank out of range, ``out`` not
            empty, classifier adapters, adapters of different bases or tasks, or unequal ranks for a method
            that needs equal ones.
    """
    import torch

    if len(references) < 2:
        raise SpecError("--adapter: give at least two adapters to compose")
    if method not in METHODS:
        raise SpecError(f"--method: '{method}' is not one of {', '.join(METHODS)}")
    combination = METHODS[method]
    prunes = any(word in combination for word in PRUNING)
    if prunes:
        density = 0.5 if density is None else density
        if not 0 < density <= 1:
            raise SpecError(f"--density: {density} must be in (0, 1] (the share of each adapter's entries kept)")
    elif density is not None:
        raise SpecError(f"--density: only for ties, dare and magnitude_prune methods, not {method}")
    if svd_rank is not None and (not combination.endswith("svd") or svd_rank < 1):
        raise SpecError("--svd-rank: a positive rank, for the svd methods only")
    check_new_folder(out)
    configs = [_adapter_config(reference, tracking_uri) for reference in references]
    if any(config.get("task_type") != "CAUSAL_LM" for config in configs):
        raise SpecError("--adapter: compose combines causal LM adapters; a classifier adapter carries its own "
                        "trained head (modules_to_save) that a weighted combination of LoRA factors cannot merge")
    ranks = [_max_rank(config) for config in configs]
    if combination in EQUAL_RANKS and len(set(ranks)) > 1:
        raise SpecError(f"--method {method}: needs adapters of equal rank, these have r = {ranks}; use --method cat "
                        "or svd, which combine any ranks")

    loaded = load_adapter(references[0], base, tracking_uri)
    names = add_adapters(loaded, {f"adapter{i}": ref for i, ref in enumerate(references[1:], 1)}, tracking_uri)
    model = loaded.model
    torch.manual_seed(seed)  # DARE drops at random
    model.add_weighted_adapter(names, weights, COMPOSED, combination_type=combination, svd_rank=svd_rank,
                               density=density)
    for name in names:
        model.delete_adapter(name)
    model.set_adapter(COMPOSED)
    rank = model.peft_config[COMPOSED].r
    trainable = sum(p.numel() for n, p in model.named_parameters() if f".{COMPOSED}." in n)

    with new_folder(out) as partial:
        model.save_pretrained(partial, selected_adapters=[COMPOSED], safe_serialization=True)
        saved = partial / COMPOSED if (partial / COMPOSED).is_dir() else partial  # PEFT nests non-default names
        for file in list(saved.iterdir()) if saved != partial else []:
            os.replace(file, partial / file.name)
        if saved != partial:
            saved.rmdir()
        loaded.tokenizer.save_pretrained(partial)
        first = Path(loaded.folder)
        if (first / JOB_FILE).is_file():  # base model and prompt format, for eval/predict/generate
            shutil.copy2(first / JOB_FILE, partial / JOB_FILE)
        (partial / COMPOSITION_FILE).write_text(json.dumps(
            {"adapters": references, "weights": weights, "method": method, "combination_type": combination,
             "density": density, "svd_rank": svd_rank, "seed": seed, "rank": rank, "base": loaded.base.path},
            indent=1))
    return Composition(out, combination, rank, trainable)


def _adapter_config(reference: str, tracking_uri: str | None) -> dict:
    from orchestrator.serve.inference import adapter_folder

    return json.loads(Path(adapter_folder(reference, tracking_uri), "adapter_config.json").read_text())


def _max_rank(config: dict) -> int:
    return max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()])


def check_model_name(name: str) -> None:
    """Raises SpecError unless ``name`` is a plain registered model name (checked before any work)."""
    import re

    from orchestrator.spec import MODEL_NAME_PATTERN

    if not re.fullmatch(MODEL_NAME_PATTERN, name):
        raise SpecError(f"--register: '{name}' is not a registered model name (letters, digits, '_', '.', '-'; "
                        "no slashes)")


def register(folder: str, name: str, tracking_uri: str | None, experiment: str = "compositions") -> tuple[str, str]:
    """Logs the composed adapter as a finished MLflow run and registers it as a new version of ``name``
    (tagged with its sources, weights and method); returns (run id, version).

    Raises:
        SpecError: a registry name that is not a plain name.
    """
    from orchestrator.tracking import registry
    from orchestrator.tracking.runs import log_composition_run

    check_model_name(name)
    uri = registry.registry_uri(tracking_uri)
    recipe = json.loads(Path(folder, COMPOSITION_FILE).read_text())
    tags = {"orchestrator.composed_from": json.dumps(recipe["adapters"]),
            "orchestrator.compose_weights": json.dumps(recipe["weights"]),
            "orchestrator.compose_method": recipe["method"], "base_model": recipe["base"]}
    params = {k: json.dumps(v) if isinstance(v, list) else v for k, v in recipe.items()}
    run_id = log_composition_run(uri, experiment, folder, params, tags)
    version = registry.register_adapter(registry.connect(uri), name, run_id, tags)
    return run_id, version
