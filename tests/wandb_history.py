"""Read the rows an offline W&B run logged back from its ``.wandb`` file (for tests without network access).

The file is W&B's LevelDB-style log (a 7-byte ``:W&B`` header, then 32 KiB blocks of
checksum/length/type-framed protobuf ``Record`` messages); :func:`read_wandb_history` decodes the
``history`` records.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any, Union

import pytest

PathLike = Union[str, Path]


def _wandb_records(path: Path) -> list[Any]:
    """Decode every protobuf ``Record`` in a ``.wandb`` file (complete records only)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if len(data) >= 4 and data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run log")
    block, header = 32768, 7
    pos, pending, payloads = header, b"", []
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if pos + header + length > len(data):  # record still being written
            break
        chunk = data[pos + header:pos + header + length]
        pos += header + length
        if kind == 1:  # full record
            payloads.append(chunk)
        elif kind == 2:  # first fragment
            pending = chunk
        elif kind == 3:  # middle fragment
            pending += chunk
        elif kind == 4:  # last fragment
            payloads.append(pending + chunk)
            pending = b""
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def read_wandb_history(run_dir: PathLike, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Read the rows logged to an offline W&B run back from its ``.wandb`` file.

    The file is W&B's LevelDB-style log (a 7-byte ``:W&B`` header, then 32 KiB blocks of
    checksum/length/type-framed protobuf ``Record`` messages); this decodes the ``history`` records.
    W&B's service process writes the file asynchronously, even after ``finish()`` has returned, so
    this waits (up to ``timeout`` seconds) for the run's final ``exit`` record. Meant for tests that
    check what was sent to W&B without network access.

    Args:
        run_dir: The run folder (``.../wandb/offline-run-*``), or the ``.wandb`` file itself.
        timeout: Seconds to wait for the run to be completely written.

    Returns:
        One dict per ``log`` call, including W&B's ``_step``, ``_runtime`` and ``_timestamp``.

    Raises:
        FileNotFoundError: If no ``.wandb`` file is found.
        ValueError: If the file is not a W&B log.
        TimeoutError: If the run's ``exit`` record does not appear within ``timeout``.
    """
    pytest.importorskip("wandb")
    path = Path(run_dir)
    if path.is_dir():
        files = sorted(path.glob("*.wandb"))
        if not files:
            raise FileNotFoundError(f"no .wandb file in {str(path)!r}")
        path = files[0]
    deadline = time.monotonic() + timeout
    while True:
        records = _wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: the W&B run was not finished (no exit record) within {timeout} s")
        time.sleep(0.05)
    return [
        {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]


def read_wandb_run(run_dir: PathLike, timeout: float = 30.0) -> dict[str, Any]:
    """What an offline W&B run holds besides its history, read back from its ``.wandb`` file.

    Waits for the run's ``exit`` record as :func:`read_wandb_history` does.

    Returns:
        ``{"name", "group", "job_type", "tags" (list), "config" (dict, W&B's ``_wandb`` key left out),
        "summary" (every summary update merged, keys as logged, ``_``-prefixed ones left out),
        "artifacts" (one dict per logged artifact: ``name``, ``type``, ``aliases``, ``metadata``,
        ``files`` {path: base64 MD5 digest}), "exit_code"}``.
    """
    read_wandb_history(run_dir, timeout)  # waits for the exit record
    path = Path(run_dir)
    path = sorted(path.glob("*.wandb"))[0] if path.is_dir() else path
    out: dict[str, Any] = {"config": {}, "summary": {}, "artifacts": []}
    for r in _wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(name=r.run.display_name, group=r.run.run_group, job_type=r.run.job_type, tags=list(r.run.tags))
            out["config"].update({u.key: json.loads(u.value_json) for u in r.run.config.update if u.key != "_wandb"})
        elif kind == "summary":
            for u in r.summary.update:
                key = u.key or "/".join(u.nested_key)
                if not key.startswith("_"):
                    out["summary"][key] = json.loads(u.value_json)
        elif kind == "artifact":
            a = r.artifact
            out["artifacts"].append({"name": a.name, "type": a.type, "aliases": list(a.aliases),
                                     "metadata": json.loads(a.metadata or "{}"),
                                     "files": {c.path: c.digest for c in a.manifest.contents}})
        elif kind == "exit":
            out["exit_code"] = r.exit.exit_code
    return out


def offline_wandb(monkeypatch: pytest.MonkeyPatch, root: Path, wandb_dir: str = "wandb-dir") -> None:
    """W&B in offline mode with every folder it writes under ``root`` (``wandb_dir`` "" is ``root`` itself), quiet,
    and none of the W&B variables of the calling shell (mode, run id, group, job type, tags) leaking into the test."""
    pytest.importorskip("wandb")
    for name, sub in (("WANDB_DIR", wandb_dir), ("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"),
                      ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(name, str(root / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_X_SAVE_REQUIREMENTS", "false")  # W&B's pip-freeze of every run: 0.5 s each, not tested here
    for name in ("WANDB_MODE", "WANDB_RUN_ID", "WANDB_RUN_GROUP", "WANDB_JOB_TYPE", "WANDB_TAGS"):
        monkeypatch.delenv(name, raising=False)
