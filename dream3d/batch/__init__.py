"""Batch asset generation: ``dream3d batch FILE`` runs many prompts on every device there is.

batch_file.py reads the batch file, manifest.py keeps ``batch.jsonl`` (what ran, where, how it
ended), scheduler.py decides what is left and feeds an executor (local.py: a process per job;
ray_executor.py: a Ray task per job), worker.py runs one job, report.py and contact_sheet.py
show the result, command.py is the CLI's side.
"""

from dream3d.errors import UserError


class BatchError(UserError, ValueError):
    """A batch cannot run as asked; the message is one line."""


class BatchInterrupted(RuntimeError):
    """The batch stopped on request; a re-run of the same command continues it."""
