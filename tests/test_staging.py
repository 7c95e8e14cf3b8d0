"""Base staging (issue 20, point 7): a base folder is copied once per node into a digest-keyed, size-bounded,
atomically published local cache. The search-level count is in test_tune.py (the study's runs)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import pytest

from orchestrator.spec import ModelSpec
from orchestrator.train import staging
from orchestrator.train.staging import (
    MANIFEST,
    CacheEntry,
    SourceFile,
    evictions,
    filesystem_type,
    is_network_filesystem,
    release,
    source_key,
    stage_base,
)


def write_base(folder: Path, weights_bytes: int = 4096, seed: int = 0) -> Path:
    """A stand-in model folder: config.json, a weights file, a nested file and a hidden one (not staged)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"seed": seed}))
    (folder / "model.safetensors").write_bytes(os.urandom(weights_bytes))
    (folder / "sub").mkdir()
    (folder / "sub" / "extra.txt").write_text("nested")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "download.lock").write_text("hub metadata")
    return folder


def staged_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.relative_to(folder)
               .as_posix().startswith("."))


def model(source: Path, cache: Path, **fields) -> ModelSpec:
    return ModelSpec(path=str(source), stage_to_local="always", local_cache_dir=str(cache), **fields)


@pytest.fixture(autouse=True)
def _release_held():
    yield
    for folder in list(staging._HELD):
        release(folder)


def test_staging_twice_copies_once_and_the_copy_matches_the_source(tmp_path):
    source, cache = write_base(tmp_path / "base"), tmp_path / "cache"
    first = stage_base(model(source, cache))
    second = stage_base(model(source, cache))
    expected = staged_bytes(source)
    assert first.copied_bytes == expected and second.copied_bytes == 0
    assert first.folder == second.folder and Path(first.folder).parent == cache
    copy = Path(first.folder)
    assert (copy / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert (copy / "sub" / "extra.txt").read_text() == "nested" and not (copy / ".cache").exists()
    manifest = json.loads((copy / MANIFEST).read_text())
    by_name = {f["name"]: f["sha256"] for f in manifest["files"]}
    assert by_name["model.safetensors"] == hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["bytes"] == expected and not list(cache.glob(".partial-*"))


def test_a_changed_source_file_gives_a_new_key_and_a_new_copy(tmp_path):
    files = [SourceFile("config.json", 10, 1), SourceFile("model.safetensors", 100, 2)]
    assert source_key(files) == source_key(list(reversed(files)))
    assert source_key(files) != source_key([files[0], SourceFile("model.safetensors", 101, 2)])  # size
    assert source_key(files) != source_key([files[0], SourceFile("model.safetensors", 100, 3)])  # mtime
    source, cache = write_base(tmp_path / "base"), tmp_path / "cache"
    before = stage_base(model(source, cache))
    stat = (source / "model.safetensors").stat()
    os.utime(source / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = stage_base(model(source, cache))
    assert after.folder != before.folder and after.copied_bytes == staged_bytes(source)


def _stage_in_process(source: str, cache: str, barrier, results) -> None:
    barrier.wait()  # all stagers start together: a real race for the copy
    staged = stage_base(model(Path(source), Path(cache)))
    copy = Path(staged.folder)
    complete = all((copy / name).is_file() for name in ("config.json", "model.safetensors", "sub/extra.txt", MANIFEST))
    results.put((staged.folder, staged.copied_bytes, complete))


def test_concurrent_stagers_in_separate_processes_make_one_copy(tmp_path):
    source, cache = write_base(tmp_path / "base", weights_bytes=48 * 2**20), tmp_path / "cache"
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(3), context.Queue()
    workers = [context.Process(target=_stage_in_process, args=(str(source), str(cache), barrier, results))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    assert len({folder for folder, _, _ in outcomes}) == 1
    assert sorted(copied for _, copied, _ in outcomes) == [0, 0, staged_bytes(source)]
    assert all(complete for _, _, complete in outcomes)
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == [Path(outcomes[0][0]).name]


def test_eviction_keeps_the_bound_and_never_evicts_the_entry_in_use(tmp_path):
    cache = tmp_path / "cache"
    bases = [write_base(tmp_path / name, weights_bytes=10_000, seed=i) for i, name in enumerate("abc")]
    size = staged_bytes(bases[0])
    bound_gb = 2.5 * size / 1e9  # room for two bases, not three
    a = stage_base(model(bases[0], cache, local_cache_gb=bound_gb))  # held by this process: in use
    b = stage_base(model(bases[1], cache, local_cache_gb=bound_gb))
    release(b.folder)  # b is idle, and more recently used than a
    c = stage_base(model(bases[2], cache, local_cache_gb=bound_gb))
    assert c.copied_bytes == size
    kept = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
    assert kept == sorted([Path(a.folder).name, Path(c.folder).name])
    assert sum(staged_bytes(cache / name) + (cache / name / MANIFEST).stat().st_size for name in kept) <= bound_gb * 1e9
    assert (Path(a.folder) / "model.safetensors").read_bytes() == (bases[0] / "model.safetensors").read_bytes()


def test_the_eviction_decision_goes_least_recently_used_first_and_names_the_numbers():
    entries = [CacheEntry("old", 40, 1.0, False), CacheEntry("held", 40, 0.5, True), CacheEntry("new", 40, 3.0, False)]
    free = 10**12
    assert evictions(entries, 30, 100, free, headroom=0) == ["old", "new"]
    assert evictions(entries, 20, 100, free, headroom=0) == ["old"]
    assert evictions(entries, 10, 200, free, headroom=0) == []
    assert "larger than model.local_cache_gb" in evictions(entries, 101, 100, free, headroom=0)
    assert "in use hold" in evictions(entries, 70, 100, free, headroom=0)  # the held entry alone leaves no room
    assert evictions(entries, 30, 1000, 35, headroom=10) == ["old"]  # the disk, not the bound, needs the room
    refused = evictions(entries, 30, 1000, 0, headroom=10**9)
    assert "GB free after evicting every idle entry" in refused and "needs" in refused


def test_a_base_larger_than_the_bound_loads_from_the_source_with_a_warning(tmp_path):
    source, cache = write_base(tmp_path / "base", weights_bytes=10_000), tmp_path / "cache"
    warnings: list[str] = []
    staged = stage_base(model(source, cache, local_cache_gb=1e-6), warn=warnings.append)  # 1000 bytes
    assert staged.folder is None and staged.loads_from == str(source.resolve()) and staged.copied_bytes == 0
    assert warnings == [staged.warning] and "larger than model.local_cache_gb (0.00 GB)" in warnings[0]
    assert not [p for p in cache.iterdir() if not p.name.startswith(".")]


def test_auto_stages_only_from_a_network_filesystem_and_never_hub_ids_or_gguf(tmp_path, monkeypatch):
    source, cache = write_base(tmp_path / "base"), tmp_path / "cache"
    auto = ModelSpec(path=str(source), local_cache_dir=str(cache))
    assert auto.stage_to_local == "auto"
    monkeypatch.setattr(staging, "filesystem_type", lambda path, mounts: "ext4")
    assert stage_base(auto).folder is None
    monkeypatch.setattr(staging, "filesystem_type", lambda path, mounts: "nfs4")
    assert stage_base(auto).copied_bytes == staged_bytes(source)
    assert stage_base(ModelSpec(path=str(source), stage_to_local="never", local_cache_dir=str(cache))).folder is None
    hub = stage_base(ModelSpec(path="org/model", stage_to_local="always", local_cache_dir=str(tmp_path / "hub")))
    assert hub.folder is None and hub.loads_from == "org/model" and not (tmp_path / "hub").exists()
    gguf = stage_base(model(source, tmp_path / "gguf", gguf_file="model.gguf"))
    assert gguf.folder is None and not (tmp_path / "gguf").exists()


def test_the_filesystem_of_a_path_is_its_longest_mount_point():
    mounts = ("/dev/vda / ext4 rw 0 0\n"
              "server:/export /mnt/shared nfs4 rw 0 0\n"
              "s3fs /mnt/my\\040bucket fuse.s3fs rw 0 0\n"
              "fuse-overlayfs /mnt/overlay fuse.fuse-overlayfs rw 0 0\n")
    assert filesystem_type("/mnt/shared/llama/config.json", mounts) == "nfs4"
    assert filesystem_type("/mnt/shared", mounts) == "nfs4"
    assert filesystem_type("/mnt/sharedother/x", mounts) == "ext4"
    assert filesystem_type("/mnt/my bucket/model", mounts) == "fuse.s3fs"
    assert [is_network_filesystem(filesystem_type(p, mounts)) for p in
            ("/mnt/shared/m", "/mnt/my bucket/m", "/mnt/overlay/m", "/home/m")] == [True, True, False, False]


def test_a_relative_cache_dir_is_made_absolute_and_a_home_one_left_for_each_node(tmp_path, monkeypatch, job):
    from orchestrator.spec import spec_from_dict

    monkeypatch.chdir(tmp_path)
    relative = spec_from_dict(job(model={"local_cache_dir": "cache"}))
    assert relative.model.local_cache_dir == str(tmp_path.resolve() / "cache")
    assert spec_from_dict(job(model={"local_cache_dir": "~/bases"})).model.local_cache_dir == "~/bases"
    assert staging.cache_root(ModelSpec(path="x", local_cache_dir="~/bases")) == Path.home() / "bases"
