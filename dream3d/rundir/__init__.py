"""The run folder on disk: the folder itself (folder.py: config, checkpoints, metrics, summary), the rule that
nothing is reached through a link out of it (confine.py), atomic writes (atomic.py), the lock (lock.py), the
record every front end reads (result.py) and the job record the web queue and the batch share (job.py)."""
