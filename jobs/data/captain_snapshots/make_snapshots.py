"""Writes two dated snapshots of the captain chat data, as a nightly export would leave them.

Run from the repository root: ``python jobs/data/captain_snapshots/make_snapshots.py``. Deterministic: the
October snapshot holds every other training chat, November all of them; both share validation and test (the
held-out chats the gate compares champion and challenger on). ``orchestrator retrain jobs/captain_retrain.yaml``
picks the newest folder (names are ISO dates).
"""

from __future__ import annotations

import shutil
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "captain_chat"


def main() -> None:
    here = Path(__file__).resolve().parent
    rows = (SOURCE / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    for name, train in (("2026-10-01", rows[::2]), ("2026-11-01", rows)):
        folder = here / name
        folder.mkdir(exist_ok=True)
        (folder / "train.jsonl").write_text("".join(train), encoding="utf-8")
        for split in ("validation", "test"):
            shutil.copyfile(SOURCE / f"{split}.jsonl", folder / f"{split}.jsonl")
        print(f"{name}: {len(train)} training chats")


if __name__ == "__main__":
    main()
