"""The batch manifest ``batch.jsonl``: one record a job, the authoritative account of what ran.

A record is the ``dream3d.rundir.job.Job`` the web app's queue keeps too, without its settings (the
batch file holds them; the job's id is their hash) and with its prompt cut for display, so the
manifest stays small although every change rewrites it. Only the coordinating process writes it,
and every change rewrites the whole file atomically (dream3d/rundir/atomic.py), so a kill at any moment
leaves the previous or the next version, never a torn one. States:

    queued   not started yet (or failed and due for a retry)
    running  a worker holds it; found so at start-up, the batch that ran it was killed
    stopped  interrupted on request; its run folder has a checkpoint to resume from
    done     exported; run_dir holds the asset
    failed   its error is recorded; retried while retryable and attempts <= retries

Manifests written before the record became ``Job`` have the same field names less ``settings``
(which defaults to empty), so they load as they are.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from dream3d.rundir.atomic import write_text
from dream3d.batch import BatchError
from dream3d.guidance.prompts import clip
from dream3d.rundir.job import STATES, Job

MANIFEST_NAME = "batch.jsonl"
_RECORD = TypeAdapter(Job)


class ManifestError(BatchError):
    """The manifest cannot be read; the message is one line."""


class Manifest:
    """The records of one output folder, by job id, in the order the jobs were first seen."""

    def __init__(self, path: Path, records: dict[str, Job] | None = None) -> None:
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
                record = _RECORD.validate_json(line)
            except ValidationError:
                raise ManifestError(f"{path}:{number}: not a batch job record") from None
            records[record.id] = record
        return cls(path, records)

    def add(self, job: Job) -> None:
        """Records a job not seen before (its settings left out, its prompt cut for display)."""
        if job.id not in self.records:
            self.records[job.id] = replace(job, prompt=clip(job.prompt), settings={})

    def update(self, job_id: str, **fields: object) -> Job:
        """Sets fields of one record and saves the manifest."""
        record = self.records[job_id] = replace(self.records[job_id], **fields)  # an unknown field is a TypeError
        self.save()
        return record

    def save(self) -> None:
        lines = (_RECORD.dump_json(r, exclude={"settings"}).decode() + "\n" for r in self.records.values())
        write_text(self.path, "".join(lines))

    def counts(self, ids: list[str] | None = None) -> dict[str, int]:
        """{state: number of jobs} over ids (default all), every state present."""
        chosen = self.records.values() if ids is None else (self.records[i] for i in ids)
        counts = dict.fromkeys(STATES, 0)
        for record in chosen:
            counts[record.state] += 1
        return counts
