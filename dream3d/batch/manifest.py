"""The batch manifest ``batch.jsonl``: one record a job, the authoritative account of what ran.

Only the coordinating process writes it, and every change rewrites the whole file
atomically (dream3d/atomic.py), so a kill at any moment leaves the previous or the next
version, never a torn one. States:

    queued   not started yet (or failed and due for a retry)
    running  a worker holds it; found so at start-up, the batch that ran it was killed
    stopped  interrupted on request; its run folder has a checkpoint to resume from
    done     exported; run_dir holds the asset
    failed   its error is recorded; retried while retryable and attempts <= retries
"""

from __future__ import annotations

from dream3d.batch import BatchError

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from dream3d.atomic import write_text

State = Literal["queued", "running", "stopped", "done", "failed"]
MANIFEST_NAME = "batch.jsonl"


class ManifestError(BatchError):
    """The manifest cannot be read; the message is one line."""


class JobRecord(BaseModel):
    """One job's record. Times are Unix seconds; seconds is the wall time of all its work
    (resumes added up); attempts counts fresh starts (a new run folder each) and retries (which
    resume the checkpoint of a worker that died), resumes the continuations of an interrupted run."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    id: str
    prompt: str
    line: int
    state: State = "queued"
    attempts: int = 0
    resumes: int = 0
    run_dir: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    seconds: float = 0.0
    train_seconds: float | None = None
    error: str | None = None
    retryable: bool = True
    where: str | None = None  # the host and worker slot of the last attempt


class Manifest:
    """The records of one output folder, by job id, in the order the jobs were first seen."""

    def __init__(self, path: Path, records: dict[str, JobRecord] | None = None) -> None:
        self.path = path
        self.records = records or {}

    @classmethod
    def load(cls, out: Path) -> "Manifest":
        """Reads ``out/batch.jsonl``; an absent file is an empty manifest."""
        path = out / MANIFEST_NAME
        if not path.exists():
            return cls(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ManifestError(f"cannot read {path}: {getattr(e, 'strerror', None) or 'not UTF-8 text'}") from None
        records = {}
        for number, line in enumerate(text.splitlines(), start=1):
            try:
                record = JobRecord.model_validate_json(line)
            except ValidationError:
                raise ManifestError(f"{path}:{number}: not a batch job record") from None
            records[record.id] = record
        return cls(path, records)

    def add(self, record: JobRecord) -> None:
        self.records.setdefault(record.id, record)

    def update(self, job_id: str, **fields: object) -> JobRecord:
        """Sets fields of one record and saves the manifest."""
        record = self.records[job_id]
        for key, value in fields.items():
            setattr(record, key, value)
        self.save()
        return record

    def save(self) -> None:
        lines = (json.dumps(r.model_dump(mode="json")) + "\n" for r in self.records.values())
        write_text(self.path, "".join(lines))

    def counts(self, ids: list[str] | None = None) -> dict[str, int]:
        """{state: number of jobs} over ids (default all), every state present."""
        chosen = self.records.values() if ids is None else (self.records[i] for i in ids)
        counts = dict.fromkeys(State.__args__, 0)
        for record in chosen:
            counts[record.state] += 1
        return counts
