"""Reading the job's data: JSONL, CSV, Parquet or a ``datasets`` save_to_disk folder, into texts and labels.

Every check that can fail on the user's files runs here, so ``validate`` and the launcher's preflight catch it
before any Ray worker starts, with the file and the column named.
"""

from __future__ import annotations

import glob
import hashlib
import time
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


FORMATS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
DATASETS_FOLDER_FILES = ("state.json", "dataset_info.json", "dataset_dict.json")  # what save_to_disk writes


def data_files(path: str, field: str) -> list[Path]:
    """The files ``path`` names: one file, a ``datasets`` save_to_disk folder (as one), every data file of a
    folder of shards, or a glob's matches (``data/train-*.parquet``, ``**`` recursive), in sorted order."""
    if any(char in path for char in "*?["):
        files = sorted(Path(f) for f in glob.glob(path, recursive=True) if Path(f).is_file())
        if not files:
            raise SpecError(f"{field}: no file matches {path}")
        return files
    root = Path(path)
    if not root.exists():
        raise SpecError(f"{field}: {path} does not exist")
    if root.is_dir() and not any((root / name).exists() for name in DATASETS_FOLDER_FILES):
        files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in FORMATS)
        if not files:
            raise SpecError(f"{field}: {path} is a folder with no data files ({', '.join(FORMATS)}) and is not a "
                            "datasets save_to_disk folder")
        return files
    return [root]


def read_table(path: str, field: str):
    """The rows of ``path`` as one pandas frame; with several files (a glob, a folder of shards) they are
    concatenated in sorted file order, and ``frame.attrs["files"]`` keeps (file, rows) so errors name the file."""
    import pandas as pd

    files = data_files(path, field)
    frames = [read_file(file, field) for file in files]
    frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    if len(frames) > 1:
        columns = [list(map(str, f.columns)) for f in frames]
        for file, names in zip(files, columns):
            if set(names) != set(columns[0]):
                raise SpecError(f"{field}: {file} has columns {names}, {files[0]} has {columns[0]}; every file of "
                                f"{path} needs the same columns")
    frame.attrs["files"] = [(str(file), len(f)) for file, f in zip(files, frames)]
    return frame


def locate(frame, path: str, row: int) -> str:
    """'row R of FILE' for the 0-based row of a frame read by :func:`read_table` (R 1-based within its file)."""
    for file, rows in frame.attrs.get("files", [(path, len(frame))]):
        if row < rows:
            return f"row {row + 1} of {file}"
        row -= rows
    return f"row {row + 1} of {path}"


def read_file(file: Path, field: str):
    import pandas as pd

    suffix = file.suffix.lower()
    try:
        if file.is_dir():
            from datasets import load_from_disk

            loaded = load_from_disk(str(file))
            if hasattr(loaded, "keys"):  # a DatasetDict: the folder holds several splits
                raise SpecError(f"{field}: {file} holds splits {list(loaded.keys())}; point at one split's folder")
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
        raise SpecError(f"{field}: {file} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except Exception as error:  # pandas / pyarrow / datasets each raise their own parse errors
        raise SpecError(f"{field}: cannot read {file}: {type(error).__name__}: {str(error)[:300]}") from None
    raise SpecError(f"{field}: {file} has an unknown format; use .jsonl, .csv, .tsv, .parquet, a datasets "
                    "save_to_disk folder, a folder of such files or a glob")


DIGEST_CACHE = "digests.json"  # in cache_home(): (path, size, mtime) of each file -> sha256
DIGEST_CHUNK = 1 << 20  # bytes read at a time: a digest never holds a file in memory
DIGEST_CACHE_ENTRIES = 2000
RACY_NS = 2_000_000_000  # files younger than this are digested, never kept


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (a folder: of its files' bytes, in sorted order), read 1 MiB at a time.

    Kept in ``cache_home()/digests.json`` under the files' (path, size, mtime in ns), as make and rsync judge a
    file unchanged: a rerun, a trial or ``validate`` on unchanged data reads nothing. A rewrite that keeps a
    file's size and restores its mtime is not seen; delete the cache file after such a rewrite."""
    root = Path(path)
    if root.is_dir():  # every file of the folder, a datasets folder's metadata included
        files = sorted(f for f in root.rglob("*") if f.is_file())
    else:  # one file, or a glob's matches
        files = data_files(path, "data") if any(char in path for char in "*?[") else [root]
    stats = [(str(f.resolve()), st.st_size, st.st_mtime_ns) for f, st in ((f, f.stat()) for f in files)]
    key = hashlib.sha256(repr(stats).encode()).hexdigest()
    cache = _digest_cache()
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    for file in files:
        stream_into(digest, file)
    # A file written in the last seconds may be rewritten within the same mtime tick (coarse on some file
    # systems): not kept, as git does for "racily clean" entries.
    if all(time.time_ns() - mtime > RACY_NS for _, _, mtime in stats):
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
            raise SpecError(f"{field}: {locate(frame, path, row)} has an empty or non-text '{spec.text_column}'")
        if label is None or (isinstance(label, str) and not label.strip()) or label != label:  # NaN != NaN
            raise SpecError(f"{field}: {locate(frame, path, row)} has no '{spec.label_column}'")
    return texts, [str(label) for label in labels]


def load_task_data(spec: DataSpec) -> TaskData:
    """Reads and checks every split; label names are the sorted training labels.

    Raises:
        SpecError: naming the file, row or column at fault.
    """
    if spec.train is None:
        raise SpecError("data.train: not given; a retrain job takes its data from retrain.data's newest snapshot: "
                        "run it with orchestrator retrain (or orchestrator validate, which resolves the snapshot)")
    pairs = mixed(spec, lambda path, field: list(zip(*read_columns(path, field, spec))))  # (text, label) rows
    texts, labels = [text for text, _ in pairs], [label for _, label in pairs]
    label_names = sorted(set(labels))
    if len(label_names) < 2:
        raise SpecError(f"data.train: {train_source(spec)} has only the label {label_names}; classification needs "
                        "two or more")
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
        train = split("train", train_source(spec), [t for i, t in enumerate(texts) if i not in held],
                      [y for i, y in enumerate(labels) if i not in held], train_digest(spec))
        val_texts, val_labels = [texts[i] for i in cut], [labels[i] for i in cut]
        validation = split("validation", f"{train_source(spec)}#validation_split={spec.validation_split}", val_texts,
                           val_labels, hashlib.sha256(repr((val_texts, val_labels)).encode()).hexdigest())
    else:
        train = split("train", train_source(spec), texts, labels, train_digest(spec))
        validation = split("validation", spec.validation, *read_columns(spec.validation, "data.validation", spec),
                           file_digest(spec.validation))
    test = None
    if spec.test:
        test = split("test", spec.test, *read_columns(spec.test, "data.test", spec), file_digest(spec.test))
    return TaskData(label_names, train, validation, test)


def mixed(spec: DataSpec, read) -> list:
    """The training rows: ``read(path, field)`` of data.train, or of each mixture source, interleaved as
    ``datasets.interleave_datasets(probabilities=normalized weights, seed=data.mixture_seed,
    stopping_strategy=data.mixture_stopping)`` orders them (it computes the order, over row indices)."""
    if isinstance(spec.train, str):
        return read(spec.train, "data.train")
    from datasets import Dataset, interleave_datasets

    parts = [read(source.path, f"data.train[{i}].path") for i, source in enumerate(spec.train)]
    total = sum(source.weight for source in spec.train)
    indices = [Dataset.from_dict({"source": [k] * len(rows), "row": list(range(len(rows)))})
               for k, rows in enumerate(parts)]
    order = interleave_datasets(indices, probabilities=[source.weight / total for source in spec.train],
                                seed=spec.mixture_seed, stopping_strategy=spec.mixture_stopping)
    return [parts[k][row] for k, row in zip(order["source"], order["row"])]


def train_source(spec: DataSpec) -> str:
    if isinstance(spec.train, str):
        return spec.train
    return "mixture(" + ", ".join(f"{s.path}:{s.weight:g}" for s in spec.train) + f"; {spec.mixture_stopping})"


def train_digest(spec: DataSpec) -> str:
    """data.train's digest; a mixture's covers its sources' bytes, weights, stopping rule and seed."""
    if isinstance(spec.train, str):
        return file_digest(spec.train)
    parts = [(s.path, s.weight, file_digest(s.path)) for s in spec.train]
    return hashlib.sha256(repr((parts, spec.mixture_stopping, spec.mixture_seed)).encode()).hexdigest()


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
