"""Checksums of a checkpoint's files, written with it and verified before it is loaded.

A checkpoint directory that has its COMPLETE marker was written whole, but its files can still
be damaged afterwards: a copy cut short, a disk that flips a byte, a file edited or truncated by
hand. torch/megatron loaders then fail with errors that name no checkpoint (EOFError, "PytorchStreamReader
failed", a pickle error) or, for flipped bytes inside a tensor, load without complaint. So every
save records the size and SHA-256 of each file in `CHECKSUMS.json` (before the marker), and every
load compares them first.

SHA-256 because hashlib's OpenSSL implementation uses the CPU's SHA extensions (about 0.7 GB/s per
core here, faster than CRC32 in zlib); the files were just written, so hashing at save reads them
from the page cache. Hashing can be split over the ranks of a job: `digest_files` takes any subset,
and the caller gathers the results (train/state.py).
"""
from __future__ import annotations

import hashlib
import json
import os

MANIFEST_NAME = "CHECKSUMS.json"
ALGORITHM = "sha256"
_CHUNK = 8 << 20
_NOT_HASHED = frozenset({MANIFEST_NAME, "COMPLETE"})  # the manifest itself, and the marker written after it


def checkpoint_files(directory: str | os.PathLike) -> list[str]:
    """Every regular file under `directory` (relative paths, sorted), except the manifest and the marker."""
    out = []
    for base, dirs, files in os.walk(directory):
        dirs.sort()
        for name in files:
            rel = os.path.relpath(os.path.join(base, name), directory)
            if rel not in _NOT_HASHED:
                out.append(rel)
    return sorted(out)


def digest_file(path: str | os.PathLike) -> dict:
    """{"size": bytes, "sha256": hex digest} of one file."""
    h = hashlib.new(ALGORITHM)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, ALGORITHM: h.hexdigest()}


def digest_files(directory: str | os.PathLike, names: list[str]) -> dict[str, dict]:
    """digest_file of each of `names` (relative to `directory`)."""
    return {name: digest_file(os.path.join(directory, name)) for name in names}


def write_manifest(directory: str | os.PathLike, digests: dict[str, dict]) -> None:
    """Write CHECKSUMS.json into `directory` (flushed to disk: the COMPLETE marker follows it)."""
    path = os.path.join(directory, MANIFEST_NAME)
    with open(path, "w") as f:
        json.dump({"algorithm": ALGORITHM, "files": dict(sorted(digests.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(directory: str | os.PathLike) -> dict[str, dict] | None:
    """{relative path: digest} from `directory`'s manifest; None when it has none (written before
    checksums existed). A manifest that cannot be read is reported as a damaged file by `verify`."""
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        files = data["files"]
        if data.get("algorithm") != ALGORITHM or not isinstance(files, dict):
            raise ValueError(f"unknown layout (algorithm {data.get('algorithm')!r})")
        return files
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {MANIFEST_NAME: {"error": f"unreadable: {e}"}}


def check_files(directory: str | os.PathLike, expected: dict[str, dict], names: list[str]) -> list[str]:
    """Problems found in `names` (a subset of the manifest's files): one line per damaged file."""
    problems = []
    for name in names:
        want = expected[name]
        if "error" in want:
            problems.append(f"{name}: {want['error']}")
            continue
        path = os.path.join(directory, name)
        try:
            size = os.path.getsize(path)
            if size != want["size"]:
                problems.append(f"{name}: {size} bytes, {want['size']} were written (truncated or overwritten)")
            elif digest_file(path)[ALGORITHM] != want[ALGORITHM]:
                problems.append(f"{name}: contents differ from the {ALGORITHM} written with it (bytes changed)")
        except OSError as e:
            problems.append(f"{name}: {e.strerror or e}")
    return problems


def verify(directory: str | os.PathLike) -> list[str] | None:
    """Every problem with `directory`'s files (empty: intact); None when it has no manifest."""
    expected = read_manifest(directory)
    if expected is None:
        return None
    return check_files(directory, expected, sorted(expected))
