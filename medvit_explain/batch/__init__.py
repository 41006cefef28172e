"""Many studies in one resumable job: ``run_batch`` with the local or the Ray engine.

See :mod:`medvit_explain.batch.job` for the resumability contract and :mod:`.records` for the files.
The Ray engine is imported only when used (optional extra ``medvit-explain[ray]``).
"""

from .job import BatchSummary, run_batch
from .manifest import Study, read_manifest
from .study import BatchSettings

__all__ = ["BatchSettings", "BatchSummary", "Study", "read_manifest", "run_batch"]
