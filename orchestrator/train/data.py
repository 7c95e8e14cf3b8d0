"""Reading the job's data: JSONL, CSV, Parquet or a ``datasets`` save_to_disk folder, into texts and labels.

Every check that can fail on the user's files runs here, so ``validate`` and the launcher's preflight catch it
before any Ray worker starts, with the file and the column named.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from orchestrator.plan.promotion import Snapshot, pick_snapshot
from orchestrator.spec import DataSpec, SnapshotSpec, SpecError


@dataclass(frozen=True)
class Split:
    """One split of a classification data set; ``labels`` are indices into :attr:`TaskData.label_names`."""

    name: str
    source: str
    texts: list[str]
    labels: list[int]
    digest: str  # sha256 of the source's bytes (or of the texts and labels, for a carved-out split)

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class TaskData:
    label_names: list[str]
    train: Split
    validation: Split
    test: Split | None


def read_table(path: str, field: str):
    import pandas as pd

    file = Path(path)
    if not file.exists():
        raise SpecError(f"{field}: {path} does not exist")
    suffix = file.suffix.lower()
    try:
        if file.is_dir():
            from datasets import load_from_disk

            loaded = load_from_disk(str(file))
            if hasattr(loaded, "keys"):  # a DatasetDict: the folder holds several splits
                raise SpecError(f"{field}: {path} holds splits {list(loaded.keys())}; point at one split's folder")
            return loaded.to_pandas()
        if suffix in (".jsonl", ".json"):
            return pd.read_json(file, lines=suffix == ".jsonl", dtype=False)
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(file, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
        if suffix == ".parquet":
            return pd.read_parquet(file)
    except SpecError:
        raise
    except UnicodeDecodeError as error:
        raise SpecError(f"{field}: {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except Exception as error:  # pandas / pyarrow / datasets each raise their own parse errors
        raise SpecError(f"{field}: cannot read {path}: {type(error).__name__}: {str(error)[:300]}") from None
    raise SpecError(f"{field}: {path} has an unknown format; use .jsonl, .csv, .tsv, .parquet or a "
                    "datasets save_to_disk folder")


DIGEST_CACHE = "digests.json"  # in cache_home(): (path, size, mtime) of each file -> sha256
DIGEST_CHUNK = 1 << 20  # bytes read at a time: a digest never holds a file in memory
DIGEST_CACHE_ENTRIES = 2000


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (a folder: of its files' bytes, in sorted order), read 1 MiB at a time.

    Kept in ``cache_home()/digests.json`` under the files' (path, size, mtime in ns), as make and rsync judge a
    file unchanged: a rerun, a trial or ``validate`` on unchanged data reads nothing. A rewrite that keeps a
    file's size and restores its mtime is not seen; delete the cache file after such a rewrite."""
    root = Path(path)
    files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(repr(stats).encode()).hexdigest()
    cache = _digest_cache()
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    for file in files:
        stream_into(digest, file)
    cache = {**_digest_cache(), key: digest.hexdigest()}  # re-read: another process may have added entries
    _write_digest_cache(dict(list(cache.items())[-DIGEST_CACHE_ENTRIES:]))
    return digest.hexdigest()


def stream_into(digest, file: Path) -> None:
    with open(file, "rb") as handle:
        while chunk := handle.read(DIGEST_CHUNK):
            digest.update(chunk)


def _digest_cache() -> dict[str, str]:
    import json

    from orchestrator.train.modeling import cache_home

    try:
        return json.loads((cache_home() / DIGEST_CACHE).read_text())
    except (OSError, ValueError):  # none yet, or unreadable: digests are recomputed, never trusted half-written
        return {}


def _write_digest_cache(cache: dict[str, str]) -> None:
    import json
    import os
    import tempfile

    from orchestrator.train.modeling import cache_home

    try:
        cache_home().mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=cache_home(), prefix=".digests-")
        with os.fdopen(fd, "w") as handle:
            json.dump(cache, handle)
        os.replace(partial, cache_home() / DIGEST_CACHE)  # atomic: readers see the old file or the new one
    except OSError:
        pass  # a read-only cache only costs the next run a re-read


def read_columns(path: str, field: str, spec: DataSpec) -> tuple[list[str], list[str]]:
    frame = read_table(path, field)
    if len(frame) == 0:
        raise SpecError(f"{field}: {path} has no rows")
    for column, key in ((spec.text_column, "data.text_column"), (spec.label_column, "data.label_column")):
        if column not in frame.columns:
            columns = ", ".join(map(str, frame.columns))
            raise SpecError(f"{key}: column '{column}' is not in {path} (columns: {columns}); set {key} to one of them")
    texts, labels = frame[spec.text_column].tolist(), frame[spec.label_column].tolist()
    for row, (text, label) in enumerate(zip(texts, labels)):
        if not isinstance(text, str) or not text.strip():
            raise SpecError(f"{field}: row {row + 1} of {path} has an empty or non-text '{spec.text_column}'")
        if label is None or (isinstance(label, str) and not label.strip()) or label != label:  # NaN != NaN
            raise SpecError(f"{field}: row {row + 1} of {path} has no '{spec.label_column}'")
    return texts, [str(label) for label in labels]


def load_task_data(spec: DataSpec) -> TaskData:
    """Reads and checks every split; label names are the sorted training labels.

    Raises:
        SpecError: naming the file, row or column at fault.
    """
    if spec.train is None:
        raise SpecError("data.train: not given; a retrain job takes its data from retrain.data's newest snapshot: "
                        "run it with orchestrator retrain (or orchestrator validate, which resolves the snapshot)")
    texts, labels = read_columns(spec.train, "data.train", spec)
    label_names = sorted(set(labels))
    if len(label_names) < 2:
        raise SpecError(f"data.train: {spec.train} has only the label {label_names}; classification needs two or more")
    index = {name: i for i, name in enumerate(label_names)}

    def split(name: str, source: str, split_texts: list[str], split_labels: list[str], digest: str) -> Split:
        unseen = sorted(set(split_labels) - set(index))
        if unseen:
            raise SpecError(f"data.{name}: labels {unseen[:5]} in {source} never occur in data.train; "
                            "add training examples for them or drop those rows")
        return Split(name, source, split_texts, [index[label] for label in split_labels], digest)

    if spec.validation_split:
        cut = validation_cut(len(texts), spec.validation_split)
        held = set(cut)
        train = split("train", spec.train, [t for i, t in enumerate(texts) if i not in held],
                      [y for i, y in enumerate(labels) if i not in held], file_digest(spec.train))
        val_texts, val_labels = [texts[i] for i in cut], [labels[i] for i in cut]
        validation = split("validation", f"{spec.train}#validation_split={spec.validation_split}", val_texts,
                           val_labels, hashlib.sha256(repr((val_texts, val_labels)).encode()).hexdigest())
    else:
        train = split("train", spec.train, texts, labels, file_digest(spec.train))
        validation = split("validation", spec.validation, *read_columns(spec.validation, "data.validation", spec),
                           file_digest(spec.validation))
    test = None
    if spec.test:
        test = split("test", spec.test, *read_columns(spec.test, "data.test", spec), file_digest(spec.test))
    return TaskData(label_names, train, validation, test)


def validation_cut(count: int, fraction: float) -> list[int]:
    """Deterministic held-out rows: every k-th row, so the cut does not depend on a random state."""
    size = max(1, round(count * fraction))
    stride = count / size
    return sorted({int(i * stride) for i in range(size)})


def resolve_snapshot(rule: SnapshotSpec) -> Snapshot:
    """Finds the snapshot on disk, checks its files exist and digests them (the same bytes give the same digest)."""
    root = Path(rule.root)
    if not root.is_dir():
        raise SpecError(f"retrain.data.root: {root} is not a folder")
    name = pick_snapshot([p.name for p in root.iterdir() if p.is_dir()], rule)
    folder = root / name
    files = {}
    for split in ("train", "validation", "test"):
        file_name = getattr(rule, split)
        if file_name is None:
            continue
        path = folder / file_name
        if not path.is_file():
            if split == "test":
                continue  # the held-out set falls back to the validation file
            raise SpecError(f"retrain.data.{split}: snapshot {name} has no {file_name} ({path})")
        files[split] = str(path)
    digest = hashlib.sha256()
    for split, path in sorted(files.items()):
        digest.update(f"{split}:{Path(path).name}\n".encode())
        stream_into(digest, Path(path))
    return Snapshot(name, str(folder), files, digest.hexdigest())
