"""The Ray engine: a pool of model-holding actors (one per GPU, or CPU workers), studies as actor tasks.

Who writes what: an actor loads a study, explains it and writes the study's outputs into
``DIR/<study_id>/`` (maps never travel back through the object store); it returns the outcome (the
outputs with sizes and SHA-256, timings, summary). The driver then checks the outputs exist with those
sizes and only then writes the completion record, so a record never points at files that are not there.
On a cluster, ``DIR`` and the inputs must therefore be on a filesystem every node sees at the same path.

Each actor runs two tasks at a time (``max_concurrency=2``) and holds a lock around the model: one
study is read from disk while the other is on the device, as in the local engine.
Needs the optional extra: ``pip install "medvit-explain[ray]"``.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import MedvitInputError
from .manifest import Study
from .records import now_iso
from .study import BatchSettings, StudyRunner, error_line, worker_name

TASKS_PER_ACTOR = 2  # one loading, one on the device


class StudyActor:
    """Holds the model for one worker (wrapped with ``ray.remote`` at run time, so this module imports
    without Ray)."""

    def __init__(self, settings: BatchSettings, out_dir: str, index: int):
        from ..model import load_model

        model = load_model(settings.model_path, device=settings.device, config=settings.model_config)
        self.runner = StudyRunner(model, settings, out_dir, worker=f"ray-{index}@{worker_name()}")
        self.lock = threading.Lock()

    def run(self, study: Study) -> dict[str, Any]:
        loaded = self.runner.load(study)  # outside the lock: overlaps with the other task's compute
        with self.lock:
            return self.runner.process(loaded)

    def describe(self) -> str:
        return f"{self.runner.worker} on {next(self.runner.model.parameters()).device}"


def import_ray():
    try:
        import ray
    except ImportError:
        raise MedvitInputError(
            "--engine ray needs Ray: pip install 'medvit-explain[ray]' (or use --engine local)"
        ) from None
    return ray


def _plan_workers(ray, settings: BatchSettings, address, workers, gpus_per_worker, log) -> tuple[int, float]:
    """How many workers with how many GPUs each, from the options and the cluster's resources; an
    impossible plan is a user error on a local Ray, a warning on a cluster that may still grow."""
    resources = ray.cluster_resources()
    cluster_gpus, cluster_cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if cluster_gpus > 0 and settings.device != "cpu" else 0.0
    if gpus_per_worker == 0 and settings.device.startswith("cuda"):
        raise MedvitInputError(f"--device {settings.device} needs --gpus-per-worker > 0 with --engine ray")
    if workers is None:
        workers = max(1, int(cluster_gpus // gpus_per_worker)) if gpus_per_worker > 0 else 1
    need_cpus, need_gpus = float(workers), workers * gpus_per_worker
    if need_cpus > cluster_cpus or need_gpus > cluster_gpus:
        message = (
            f"{workers} worker(s) need {need_cpus:g} CPU and {need_gpus:g} GPU; the Ray cluster has "
            f"{cluster_cpus:g} CPU and {cluster_gpus:g} GPU (lower --workers or --gpus-per-worker)"
        )
        if address is None:
            raise MedvitInputError(message)
        log(f"warning: {message}; waiting for the cluster to provide them")
    log(
        f"ray: {workers} worker(s), {gpus_per_worker:g} GPU each, on a cluster with {cluster_cpus:g} CPU and "
        f"{cluster_gpus:g} GPU"
    )
    return workers, gpus_per_worker


def _drain(ray, actors: list[Any], studies: Sequence[Study], on_result) -> None:
    """Keep ``TASKS_PER_ACTOR`` studies queued on each actor until all are done; a study whose worker
    failed is recorded as failed, never lost."""
    queue = deque(studies)
    pending: dict[Any, tuple[Study, Any]] = {}

    def submit(actor) -> None:
        if queue:
            study = queue.popleft()
            pending[actor.run.remote(study)] = (study, actor)

    for _ in range(TASKS_PER_ACTOR):
        for actor in actors:
            submit(actor)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        study, actor = pending.pop(ready[0])
        try:
            outcome = ray.get(ready[0])
        except ray.exceptions.RayError as exc:  # the worker died or the task could not run: record it
            outcome = {
                "study_id": study.study_id,
                "path": study.path,
                "status": "failed",
                "error": f"ray worker failed: {error_line(exc).splitlines()[0]}",
                "traceback": str(exc),
                "worker": "ray",
                "timings_s": {},
                "finished_at": now_iso(),
            }
        on_result(outcome)
        submit(actor)


def run_ray(
    settings: BatchSettings,
    out_dir: Path,
    studies: Sequence[Study],
    on_result: Callable[[dict[str, Any]], None],
    *,
    address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Process ``studies`` on a Ray pool; ``on_result(outcome)`` is called in the driver after each one.

    Starts a local Ray (all this machine's CPUs and GPUs) unless Ray is already initialised in this
    process or ``address`` names a cluster (``auto``, ``host:6379`` or ``ray://host:10001``).
    ``gpus_per_worker`` defaults to 1 when the cluster has GPUs and ``--device`` is not ``cpu``;
    ``workers`` defaults to the GPUs divided by ``gpus_per_worker``, or 1 CPU worker."""
    if not studies:
        return
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(include_dashboard=False, log_to_driver=True)
        started = True
    actors: list[Any] = []
    try:
        workers, gpus_per_worker = _plan_workers(ray, settings, address, workers, gpus_per_worker, log)
        # on a GPU worker Ray sets CUDA_VISIBLE_DEVICES: the worker's GPU is its "cuda"
        device = "cpu" if settings.device == "cpu" or gpus_per_worker == 0 else "cuda"
        worker_settings = replace(settings, device=device)
        actor_cls = ray.remote(num_cpus=1, num_gpus=gpus_per_worker, max_concurrency=TASKS_PER_ACTOR, max_restarts=1)(
            StudyActor
        )
        actors = [actor_cls.remote(worker_settings, str(out_dir), i) for i in range(workers)]
        _drain(ray, actors, studies, on_result)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
