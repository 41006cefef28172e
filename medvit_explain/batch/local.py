"""The local engine: one process, one device, the next study loaded while the current one is explained."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .manifest import Study
from .study import BatchSettings, StudyRunner


def run_local(
    model, settings: BatchSettings, out_dir: Path, studies: Sequence[Study], on_result: Callable[[dict[str, Any]], None]
) -> None:
    """Process ``studies`` in order with ``model``; ``on_result(outcome)`` is called after each one.

    Reading a volume (decompression, DICOM parsing) runs in one background thread while the model works
    on the previous volume, so at most two volumes are in memory at a time."""
    if not studies:
        return
    runner = StudyRunner(model, settings, out_dir)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="medvit-load") as loader:
        upcoming = loader.submit(runner.load, studies[0])
        for i in range(len(studies)):
            loaded = upcoming.result()  # load() keeps a study's error in the result; it does not raise
            if i + 1 < len(studies):
                upcoming = loader.submit(runner.load, studies[i + 1])
            on_result(runner.process(loaded))
