"""One study, start to finish: load it, explain it, write its outputs. Shared by both engines.

The engine calls :meth:`StudyRunner.load` (I/O, may run in a background thread while the previous study
is on the device) and then :meth:`StudyRunner.process`, which never raises for a study's own problem:
it returns an *outcome* dict (``status`` ``done`` or ``failed``) that the driver turns into a record.
Writing the completion record is the driver's job, after it has checked the outputs exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MedvitInputError
from ..vocabulary import DEFAULT_MAP_DTYPE
from ..workflows.studies import Study
from .records import clear_study_dir, input_identity, list_outputs, now_iso

SUMMARY_KEYS = (
    "mode",
    "n_rows",
    "max_malignancy_prob",
    "max_malignancy_slice",
    "max_malignancy_source_index",
    "max_malignancy_roi",
)


@dataclass
class BatchSettings:
    """The explain options of a batch (the same as ``explain``'s), picklable for Ray workers."""

    model_path: str | None = None
    model_config: str | None = None
    methods: tuple[str, ...] = ("cdam", "agcam")
    targets: list[str | int] | None = None  # None: every target of the model
    device: str = "auto"
    batch_size: int = 16
    precision: str = "fp32"
    report: bool = True
    dicom: bool = False
    roi_from_mask: bool = False
    allow_modality: bool = False
    map_dtype: str = DEFAULT_MAP_DTYPE

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["methods"] = list(self.methods)
        return out


@dataclass
class OutputSpec:
    """What decides a study's outputs: a record made with another spec is stale and the study is redone."""

    methods: list[str]
    targets: list[str]
    model_sha256: str | None
    precision: str
    report: bool
    dicom: bool
    roi_from_mask: bool
    map_dtype: str = DEFAULT_MAP_DTYPE
    extra: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def output_spec(model, settings: BatchSettings) -> OutputSpec:
    """The output spec of ``settings`` with ``model`` (resolves the targets; raises TargetError)."""
    indices = model.task_spec.resolve(settings.targets)
    return OutputSpec(
        methods=list(settings.methods),
        targets=[model.targets[i] for i in indices],
        model_sha256=(getattr(model, "source_info", None) or {}).get("sha256"),
        precision=settings.precision,
        report=settings.report,
        dicom=settings.dicom,
        roi_from_mask=settings.roi_from_mask,
        map_dtype=settings.map_dtype,
    )


@dataclass
class LoadedStudy:
    """A study read from disk (or the error that stopped it)."""

    study: Study
    volume: Any = None
    roi_mask: Any = None
    input: dict[str, Any] | None = None  # the input's identity when it was read (see records.input_identity)
    load_s: float = 0.0
    error: str | None = None
    trace: str | None = None


def error_line(exc: BaseException) -> str:
    """One line naming the error (the type is left out for the user-input errors, whose text says it all)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, MedvitInputError) else f"{type(exc).__name__}: {text}"


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class StudyRunner:
    """Holds the model and the settings; loads and processes studies into ``out_dir/<study_id>/``."""

    def __init__(self, model, settings: BatchSettings, out_dir: str | os.PathLike, worker: str | None = None):
        self.model = model
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.worker = worker or worker_name()
        self.target_names = output_spec(model, settings).targets
        from .. import pipeline  # noqa: F401  (import the heavy stack once, before the first study is timed)

    def load(self, study: Study) -> LoadedStudy:
        """Read the CT (and the ROI mask with ``roi_from_mask``); an error is kept, not raised."""
        from ..io import load_volume

        t0 = time.perf_counter()
        loaded = LoadedStudy(study)
        try:
            # taken before reading: a change while the study runs leaves a stale identity, so it is redone
            loaded.input = input_identity(study.path, study.nodule_mask if self.settings.roi_from_mask else None)
            loaded.volume = load_volume(study.path, allow_modality=self.settings.allow_modality)
            if self.settings.roi_from_mask:
                if not study.nodule_mask:
                    raise MedvitInputError("--roi-from-mask needs a nodule_mask for this study; none was given")
                loaded.roi_mask = load_volume(study.nodule_mask)
        except Exception as exc:  # recorded as this study's failure by process()
            loaded.volume = loaded.roi_mask = None
            loaded.error, loaded.trace = error_line(exc), traceback.format_exc()
        loaded.load_s = time.perf_counter() - t0
        return loaded

    def process(self, loaded: LoadedStudy) -> dict[str, Any]:
        """Explain a loaded study and write its outputs; the outcome says ``done`` or ``failed`` (and why)."""
        from ..outputs import write_outputs
        from ..pipeline import explain_volume

        study = loaded.study
        study_dir = self.out_dir / study.study_id
        t0 = time.perf_counter()
        timings = {"load": round(loaded.load_s, 4)}
        base = {
            "study_id": study.study_id,
            "path": study.path,
            "input": loaded.input,
            "worker": self.worker,
            "timings_s": timings,
        }
        if loaded.error is not None:
            timings["total"] = timings["load"]
            return {
                **base,
                "status": "failed",
                "error": loaded.error,
                "traceback": loaded.trace,
                "finished_at": now_iso(),
            }
        try:
            clear_study_dir(study_dir)  # a study without a valid record is redone from scratch
            result = explain_volume(
                self.model,
                loaded.volume,
                methods=list(self.settings.methods),
                targets=self.target_names,
                batch_size=self.settings.batch_size,
                precision=self.settings.precision,
                roi_mask=loaded.roi_mask,
            )
            t1 = time.perf_counter()
            dicom = self.settings.dicom and str(loaded.volume.metadata.get("format", "")).startswith("dicom")
            write_outputs(
                result,
                study_dir,
                stem=study.study_id,
                map_dtype=self.settings.map_dtype,
                report=self.settings.report,
                dicom=dicom,
            )
            t2 = time.perf_counter()
            outputs = list_outputs(study_dir)
        except Exception as exc:  # one study's failure must not stop the others; it is recorded with its trace
            trace = traceback.format_exc()
            timings["total"] = round(loaded.load_s + time.perf_counter() - t0, 4)
            try:
                clear_study_dir(study_dir)  # no partial output stays at a final path
            except (OSError, MedvitInputError):
                pass  # the failure record written next says what happened; leftovers carry no record
            return {**base, "status": "failed", "error": error_line(exc), "traceback": trace, "finished_at": now_iso()}
        summary = result.predictions.summary()
        timings.update(
            {
                "explain": round(t1 - t0, 4),
                "write": round(t2 - t1, 4),
                "total": round(loaded.load_s + time.perf_counter() - t0, 4),
            }
        )
        return {
            **base,
            "status": "done",
            "outputs": outputs,
            "device": result.device,
            "summary": {k: summary[k] for k in SUMMARY_KEYS if k in summary},
            "dicom_written": dicom,
            "finished_at": now_iso(),
        }
