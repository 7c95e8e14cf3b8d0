"""orchestrator: distributed LoRA fine-tuning on Ray Train + DeepSpeed, tracked in MLflow.

    from orchestrator import load_spec
    from orchestrator import train
    result = train(load_spec("jobs/quickstart.yaml", ["lora.r=16"]))
    print(result.adapter_dir, result.metrics["test_accuracy"])
"""

from orchestrator.spec import JobSpec, SpecError, load_spec
from orchestrator.workflows.training import TrainResult, train

__all__ = ["JobSpec", "SpecError", "TrainResult", "load_spec", "train"]
