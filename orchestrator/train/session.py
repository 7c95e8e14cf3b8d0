"""What the training loop needs from whoever runs it: rank, reporting, checkpoints, progress.

Ray Train provides it on a cluster (``launcher.RayContext``); :class:`LocalContext` provides it in-process
(a world-size-1 gloo group on CPU) so the one training loop also runs in fast tests and GPU checks.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol


class WorkerContext(Protocol):
    rank: int
    world_size: int
    node_id: str  # the Ray node this worker runs on ("local" in-process)

    def restore(self) -> AbstractContextManager[str | None]:
        """The latest reported checkpoint as a local folder, or None on a fresh start."""

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None, name: str) -> None:
        """Reports metrics (all ranks must call it together) and persists ``checkpoint_dir`` if given."""

    def progress(self, update: dict[str, Any]) -> None:
        """A cheap, non-blocking progress note for the driver's console (only rank 0's are shown)."""


class LocalContext:
    """In-process, world size 1 (gloo on CPU, nccl on a GPU): checkpoints are copied into
    ``checkpoint_root/NAME`` and kept."""

    rank, world_size, node_id = 0, 1, "local"

    def __init__(self, checkpoint_root: str, on_progress=None, backend: str = "gloo"):
        import torch.distributed as dist

        self.checkpoint_root = Path(checkpoint_root)
        self._on_progress = on_progress
        if not dist.is_initialized():
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
            if backend == "nccl":  # what Ray's worker context does: the worker's GPU is the current device
                import torch

                torch.cuda.set_device(0)
            dist.init_process_group(backend, rank=0, world_size=1)

    @contextmanager
    def restore(self) -> Iterator[str | None]:
        saved = sorted(self.checkpoint_root.glob("step_*")) if self.checkpoint_root.exists() else []
        yield str(saved[-1]) if saved else None

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None, name: str) -> None:
        if checkpoint_dir:
            shutil.copytree(checkpoint_dir, self.checkpoint_root / name, dirs_exist_ok=True)

    def progress(self, update: dict[str, Any]) -> None:
        if self._on_progress:
            self._on_progress(update)
