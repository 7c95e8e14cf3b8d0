"""The base model's files, staged once per node into a node-local cache, so a search's trials load from local disk.

A 64-trial search of a 70B base on 16 workers would otherwise read 140 GB from shared storage per worker per trial.
The first worker of a node to arrive copies the folder (under an ``fcntl.flock`` on the cache, so the node's other
workers wait and then reuse it); the copy is written to a temporary folder, its manifest last, and published by one
``os.rename``, so a reader never sees half a base.

The key: sha256 over (relative name, size, mtime_ns) of every file of the source folder, from ``stat`` alone:
hashing the contents on every trial would itself read the whole base from shared storage. A changed file (a new
size or mtime) gives a new key. The contents' sha256 is computed while copying (one streaming pass, no second
read) and kept in the entry's manifest, per file, for whoever wants to check a copy against the source.

The bound: the cache keeps at most ``model.local_cache_gb`` (default: half its disk); least recently used entries
are evicted before a new copy, never one a live worker holds (each holder keeps a shared ``flock`` on the entry's
``.use`` file until its process exits; eviction needs the exclusive lock). A base larger than the bound, or than the
disk's free space, loads from ``model.path`` with a warning giving the numbers.

One lock per cache: a node stages one base at a time. The ranks that are ready first wait at the loop's next
collective, so the node's first copy must finish within ``scaling.collective_timeout_s`` (140 GB at the 212 MB/s
measured on a small CPU box is 11 minutes, under the default 30).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.spec import ModelSpec
from orchestrator.train.modeling import cache_home, resolve_model_path

__all__ = ["MANIFEST", "CacheEntry", "SourceFile", "Staged", "cache_root", "evictions", "filesystem_type",
           "is_network_filesystem", "list_source", "release", "source_key", "stage_base"]

MANIFEST = "orchestrator_staged.json"  # written last inside an entry, before the rename that publishes it
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph",
                                 "cephfs", "glusterfs", "wekafs", "panfs", "afs", "orangefs", "9p", "virtiofs"})
LOCAL_FUSE = frozenset({"fuse.fuse-overlayfs", "fuse.lxcfs"})  # fuse mounts that are not remote storage
HEADROOM_BYTES = 2**30  # left free on the cache's disk after a copy (logs, checkpoints, /tmp share it)
_CHUNK = 16 * 2**20  # bytes per read while copying and hashing
_HELD: dict[str, int] = {}  # entry folder -> the open file holding its shared in-use lock (until process exit)


@dataclass(frozen=True)
class SourceFile:
    name: str  # relative, '/'-separated
    size: int  # bytes
    mtime_ns: int


@dataclass(frozen=True)
class CacheEntry:
    name: str  # the entry's folder name in the cache
    size: int  # bytes
    last_used: float  # seconds since the epoch: the mtime of its .use file, touched on every use
    in_use: bool  # a live process holds it


@dataclass(frozen=True)
class Staged:
    """Where the base loads from: ``folder`` (this node's copy) or, when it is None, ``source`` itself."""

    source: str
    folder: str | None
    copied_bytes: int  # read from ``source`` by this call: the whole base once per node, 0 on reuse
    warning: str | None = None  # why a base that should have been staged was not

    @property
    def loads_from(self) -> str:
        return self.folder or self.source


def source_key(files: Iterable[SourceFile]) -> str:
    """16 hex digits of sha256 over every file's (name, size, mtime_ns), order-independent."""
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda f: f.name):
        digest.update(f"{file.name}\0{file.size}\0{file.mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def evictions(entries: Sequence[CacheEntry], incoming: int, bound: int, free: int,
              headroom: int = HEADROOM_BYTES) -> list[str] | str:
    """The entries to delete, least recently used first, so that ``incoming`` more bytes keep the cache within
    ``bound`` and the disk (``free`` bytes now) with ``headroom`` to spare; or, when no choice of idle entries
    makes room, the reason, with the numbers."""
    gb = 1e9
    if incoming > bound:
        return f"the base ({incoming / gb:.2f} GB) is larger than model.local_cache_gb ({bound / gb:.2f} GB)"
    held, evict = sum(e.size for e in entries), []
    for entry in sorted((e for e in entries if not e.in_use), key=lambda e: e.last_used):
        if held + incoming <= bound and free >= incoming + headroom:
            break
        evict.append(entry.name)
        held, free = held - entry.size, free + entry.size
    if held + incoming > bound:
        return (f"the cache's entries in use hold {held / gb:.2f} GB; with the base ({incoming / gb:.2f} GB) "
                f"that exceeds model.local_cache_gb ({bound / gb:.2f} GB)")
    if free < incoming + headroom:
        return (f"the cache's disk has {free / gb:.2f} GB free after evicting every idle entry; the base needs "
                f"{incoming / gb:.2f} GB plus {headroom / gb:.2f} GB headroom")
    return evict


def filesystem_type(path: str, mounts: str) -> str:
    """The type of the filesystem holding the absolute ``path``, from /proc/mounts text (the longest mount point
    that contains it)."""
    best, kind = "", "unknown"
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[1])  # /proc/mounts: a space is \040
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def is_network_filesystem(kind: str) -> bool:
    return kind in NETWORK_FILESYSTEMS or (kind.startswith("fuse.") and kind not in LOCAL_FUSE)


def list_source(folder: Path) -> list[SourceFile]:
    """Every file under ``folder`` (symlinks followed, as the HF hub cache's snapshots need), hidden ones left out
    (``.git``, ``.cache/huggingface`` download metadata)."""
    files = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(n for n in names if not n.startswith(".")):
            stat = Path(root, name).stat()
            files.append(SourceFile(Path(root, name).relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns))
    return files


def cache_root(model: ModelSpec) -> Path:
    """``model.local_cache_dir``, else $ORCHESTRATOR_CACHE/bases (default ~/.cache/orchestrator/bases)."""
    if model.local_cache_dir:
        return Path(model.local_cache_dir).expanduser()
    return cache_home() / "bases"


def stage_base(model: ModelSpec, warn: Callable[[str], None] = lambda text: None) -> Staged:
    """This node's copy of the base's folder, made on the first call per node and reused after (see the module
    docstring); ``source`` alone when staging is off, not needed (a hub id, a GGUF file, ``auto`` on a local
    disk) or impossible (the bound, the free space: then ``warn`` says why)."""
    if model.gguf_file is not None or model.stage_to_local == "never":
        return Staged(model.path, None, 0)  # GGUF: model_folder already caches its dequantized folder per machine
    source = resolve_model_path(model.path)
    if not Path(source).is_dir():
        return Staged(source, None, 0)  # a hub id: transformers' own cache is per machine
    source = str(Path(source).resolve())
    if model.stage_to_local == "auto":
        mounts = Path("/proc/mounts").read_text() if Path("/proc/mounts").exists() else ""
        if not is_network_filesystem(filesystem_type(source, mounts)):
            return Staged(source, None, 0)
    files = list_source(Path(source))
    key, size = source_key(files), sum(f.size for f in files)
    cache = cache_root(model)
    cache.mkdir(parents=True, exist_ok=True)
    entry = cache / f"{Path(source).name}-{key}"
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one stager per node at a time; the rest wait here, then reuse
        if _complete(entry):
            _hold(entry)
            return Staged(source, str(entry), 0)
        bound = int(model.local_cache_gb * 1e9) if model.local_cache_gb else shutil.disk_usage(cache).total // 2
        decision = evictions(_entries(cache), size, bound, shutil.disk_usage(cache).free)
        if isinstance(decision, str):
            text = f"base not staged into {cache}: {decision}; every worker reads it from {source}"
            warn(text)
            return Staged(source, None, 0, text)
        for name in decision:
            shutil.rmtree(cache / name, ignore_errors=True)
            Path(cache, f".{name}.use").unlink(missing_ok=True)
        for stale in cache.glob(".partial-*"):  # a copier killed mid-way (it held the lock we now hold)
            shutil.rmtree(stale, ignore_errors=True)
        copied = _copy(Path(source), files, entry, key)
        if copied is None:
            text = f"base not staged: {source} changed while it was copied; every worker reads it from there"
            warn(text)
            return Staged(source, None, 0, text)
        _hold(entry)
        return Staged(source, str(entry), copied)


def release(folder: str) -> None:
    """Lets the cache evict ``folder`` again (a process holds what it staged until it exits, or until this)."""
    held = _HELD.pop(folder, None)
    if held is not None:
        os.close(held)


def _copy(source: Path, files: list[SourceFile], entry: Path, key: str) -> int | None:
    """Copies and hashes ``files`` in one pass into a temporary folder, writes the manifest last and renames it to
    ``entry``; the bytes read, or None when the source changed meanwhile (the partial copy is removed)."""
    partial = Path(tempfile.mkdtemp(prefix=f".partial-{entry.name}-", dir=entry.parent))
    try:
        read, manifest = 0, []
        for file in files:
            digest, target = hashlib.sha256(), partial / file.name
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(source / file.name, "rb") as src, open(target, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    read += len(chunk)
            manifest.append({"name": file.name, "size": file.size, "mtime_ns": file.mtime_ns,
                             "sha256": digest.hexdigest()})
        if source_key(list_source(source)) != key:
            return None
        content = hashlib.sha256("".join(f["sha256"] for f in manifest).encode()).hexdigest()
        (partial / MANIFEST).write_text(json.dumps({"source": str(source), "key": key, "content_sha256": content,
                                                    "bytes": read, "staged_at": time.time(), "files": manifest},
                                                   indent=1))
        os.rename(partial, entry)
        return read
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _complete(entry: Path) -> bool:
    """A published entry whose files are all there at their recorded sizes (``stat`` only)."""
    try:
        files = json.loads((entry / MANIFEST).read_text())["files"]
        return all((entry / f["name"]).stat().st_size == f["size"] for f in files)
    except (OSError, ValueError, KeyError):
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)  # damaged (someone deleted files): copied afresh
        return False


def _entries(cache: Path) -> list[CacheEntry]:
    """The cache's published entries; ``in_use`` when some process holds the shared lock on its .use file."""
    found = []
    for folder in sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            size = json.loads((folder / MANIFEST).read_text())["bytes"]
        except (OSError, ValueError, KeyError):
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        use = cache / f".{folder.name}.use"
        last_used = use.stat().st_mtime if use.exists() else folder.stat().st_mtime
        found.append(CacheEntry(folder.name, size, last_used, _in_use(use)))
    return found


def _in_use(use: Path) -> bool:
    if not use.exists():
        return False
    fd = os.open(use, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's lock, if it got one


def _hold(entry: Path) -> None:
    """Marks ``entry`` in use by this process (a shared flock, released when the process exits) and touches its
    last use."""
    use = entry.parent / f".{entry.name}.use"
    if str(entry) not in _HELD:
        fd = os.open(use, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        _HELD[str(entry)] = fd
    os.utime(use)
