"""A DICOM volume's results as DICOM objects in a new series of its study: each
explanation's float Parametric Map (one frame per source slice, on the series' Frame of
Reference), one Segmentation of where each map is at least 0.5, and the SR report with
each class's peak as a 3-D point (``imaging/volume_dicom_out.py`` makes them; this
module decides which, and says why one cannot be made)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from service.contract.responses import DicomObject, DicomUids, Explanation, Heatmap
from service.imaging import dicom_seg
from service.imaging.dicom_codes import Explained
from service.imaging.dicom_out import PM_SOP_CLASS_UID, DerivedFrom, new_uid
from service.imaging.dicom_sr import MadeObject
from service.imaging.volume_dicom_out import (
    VolumeFinding,
    volume_objects_problem,
    volume_parametric_map,
    volume_peak,
    volume_report,
    volume_segmentation,
)
from service.pipeline.results import build_object, encoded, segmentation_answer
from service.pipeline.volumes import PreparedVolume

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


def volume_dicom_problem(prepared: PreparedVolume, what: str) -> str | None:
    """Why no DICOM object derived from this volume can be made, or None."""
    if prepared.sources is None:
        return (
            f"{what} is a DICOM object derived from a DICOM series; volume {prepared.index} "
            "is a NIfTI file (ask for 'nifti')"
        )
    return volume_objects_problem(prepared.sources)


@dataclass
class VolumeObjects:
    """A volume's DICOM objects as its explanations are drawn: the Parametric Maps, and
    what its Segmentation and report collect from each map at the source's grid."""

    prepared: PreparedVolume
    how: Explained
    series_uid: str = field(default_factory=new_uid)  # the Parametric Maps' series
    segments: list[dicom_seg.Segment] = field(default_factory=list)
    findings: list[VolumeFinding] = field(default_factory=list)

    @property
    def _sources(self) -> Sequence[Dataset] | Dataset:
        assert self.prepared.sources is not None  # volume_dicom_problem said so
        return self.prepared.sources

    @property
    def study(self) -> str:
        first = self._sources if not isinstance(self._sources, Sequence) else self._sources[0]
        return str(first.StudyInstanceUID)

    def _build(self, what: str, build: Callable[[], bytes]) -> tuple[bytes | None, str]:
        return build_object(self.prepared.index, what, build)

    def parametric_map(self, out: Heatmap, heat: np.ndarray, label: str, number: int) -> None:
        """Explanation ``number``'s map (``heat`` at the source's grid) as ``out``'s
        Parametric Map, or its reason."""
        reason = volume_dicom_problem(self.prepared, "dicom-pm")
        made = DerivedFrom(
            label=label,
            method=self.how.method,
            layer=self.how.layer,
            model=self.how.model,
            instance_number=number,
            series_uid=self.series_uid,
            instance_uid=new_uid(),
        )
        data = None
        if reason is None:
            data, reason = self._build(
                "dicom-pm", lambda: volume_parametric_map(self._sources, heat, made)
            )
        if data is None:
            out.reason = reason
            return
        out.data = encoded(data)
        out.uids = DicomUids(study=self.study, series=made.series_uid, instance=made.instance_uid)

    def collect(self, target: int, label: str, score: float, heat: np.ndarray) -> None:
        """What the Segmentation and the report need of one explanation's map."""
        self.segments.append(dicom_seg.Segment(target, label, dicom_seg.mask_of(heat)))
        peak = volume_peak(heat, self.prepared.geometry.source_affine)
        self.findings.append(VolumeFinding(target, label, score, peak))

    def segmentation(self, explanations: Sequence[Explanation]) -> DicomObject:
        """The volume's Segmentation; each heatmap gets its segment number, or the reason."""
        reason = volume_dicom_problem(self.prepared, "dicom-seg")
        if reason is not None:
            return segmentation_answer(None, reason, None, explanations)
        series, instance = new_uid(), new_uid()
        data, reason = self._build(
            "dicom-seg",
            lambda: volume_segmentation(self._sources, self.segments, self.how, series, instance),
        )
        uids = DicomUids(study=self.study, series=series, instance=instance)
        return segmentation_answer(data, reason, uids, explanations)

    def report(
        self, explanations: Sequence[Explanation], segmentation: DicomObject | None
    ) -> DicomObject:
        """The volume's SR Measurement Report, naming the objects made with it."""
        reason = volume_dicom_problem(self.prepared, "dicom-sr")
        if reason is not None:
            return DicomObject(reason=reason)
        made = [
            MadeObject(PM_SOP_CLASS_UID, e.heatmap.uids.series, e.heatmap.uids.instance)
            for e in explanations
            if e.heatmap.data is not None and e.heatmap.uids is not None
        ]
        if segmentation is not None and segmentation.uids is not None:
            uids = segmentation.uids
            made.append(MadeObject(dicom_seg.SOP_CLASS_UID, uids.series, uids.instance))
        series, instance = new_uid(), new_uid()
        data, reason = self._build(
            "dicom-sr",
            lambda: volume_report(self._sources, self.findings, self.how, made, series, instance),
        )
        if data is None:
            return DicomObject(reason=reason)
        return DicomObject(
            data=encoded(data), uids=DicomUids(study=self.study, series=series, instance=instance)
        )
