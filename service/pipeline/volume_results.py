"""A volume model's answer for one volume: predictions, and each explanation's map at the
layer's grid, the input's or the file's own (``original``, whatever its orientation), as
an array, a float32 NIfTI file that carries its grid's affine, or a picture of three
orthogonal slices through the peak; each with its affine and its peak in millimetres."""

from __future__ import annotations

import base64

import numpy as np

from service.contract.responses import (
    Explanation,
    Heatmap,
    ImageResult,
    Picture,
    VolumeGeometry,
    VolumePeak,
)
from service.contract.terms import DICOM_FORMATS
from service.imaging.dicom_codes import Explained
from service.imaging.encoders import encode_image
from service.imaging.nifti import write_nifti
from service.imaging.render import normalise
from service.imaging.values import to_uint8
from service.imaging.volume import peak_at
from service.imaging.volume_fitting import map_to_source, resize_volume, upsample_map
from service.imaging.volume_pictures import three_views
from service.pipeline.engine_call import ExplainedVolume
from service.pipeline.results import RenderOptions, prediction
from service.pipeline.volume_dicom import VolumeObjects
from service.pipeline.volumes import PreparedVolume
from service.transport.interface import ModelInfo

# A map and its grid's affine.
Drawn = tuple[np.ndarray, np.ndarray]


def map_at(cam: np.ndarray, prepared: PreparedVolume, size: str) -> tuple[np.ndarray, np.ndarray]:
    """(map, affine): a raw layer map at ``size``, normalised to [0, 1], and the affine of
    its grid (voxel index → RAS+ mm)."""
    geometry = prepared.geometry
    if size == "layer":
        shape = (int(cam.shape[0]), int(cam.shape[1]), int(cam.shape[2]))
        return normalise(cam.astype(np.float32)), geometry.grid_affine(shape)
    heat = upsample_map(cam.astype(np.float32), geometry.input_size)
    if size == "input":
        return normalise(heat), geometry.input_affine
    return normalise(map_to_source(heat, geometry)), geometry.source_affine


def _base_at(prepared: PreparedVolume, shape: tuple[int, ...], size: str) -> np.ndarray:
    """The volume under an overlay, on the map's grid, in [0, 1]."""
    if size == "original" and prepared.base is not None:
        return prepared.base
    volume = prepared.pixels[..., 0]
    if volume.shape == shape:
        return volume
    return resize_volume(volume, (shape[0], shape[1], shape[2]), "area")


def peak_answer(heat: np.ndarray, affine: np.ndarray) -> VolumePeak:
    """Where ``heat`` is highest, as the answer says it: its voxel on the map's grid, and
    that voxel's centre in RAS+ mm."""
    voxel, mm = peak_at(heat, affine)
    return VolumePeak(voxel=list(voxel), mm=[round(v, 3) for v in mm])


def render_volume_heatmap(
    cam: np.ndarray, prepared: PreparedVolume, render: RenderOptions, drawn: Drawn | None = None
) -> Heatmap:
    """One explanation's map in the requested format and size (``drawn``: the map
    already at that size, and its grid's affine)."""
    options = render.heatmap
    heat, affine = drawn if drawn is not None else map_at(cam, prepared, options.size)
    depth, height, width = heat.shape
    out = Heatmap(
        format=options.format,
        width=width,
        height=height,
        depth=depth,
        raw_max=float(cam.max()),
        affine=affine.round(6).tolist(),
        peak=peak_answer(heat, affine),
    )
    if options.format == "array":
        out.values = heat
    elif options.format == "nifti":
        out.data = base64.b64encode(write_nifti(heat, affine)).decode("ascii")
    elif options.format in ("png", "overlay", "gray"):
        base = _base_at(prepared, heat.shape, options.size) if options.format == "overlay" else None
        picture = three_views(heat, affine, base, options.format)
        out.encoding = options.encoding
        out.data = base64.b64encode(encode_image(picture, options.encoding)).decode("ascii")
    return out


def _explanations(
    result: ExplainedVolume, model: ModelInfo, render: RenderOptions, objects: VolumeObjects | None
) -> list[Explanation]:
    """Each explanation's heatmap; its DICOM objects' share (``objects``), where asked."""
    prepared, size = result.prepared, render.heatmap.size
    explanations = []
    for number, (target, cam) in enumerate(zip(result.targets, result.cams, strict=True), 1):
        drawn = map_at(cam, prepared, size)
        heatmap = render_volume_heatmap(cam, prepared, render, drawn)
        label = model.labels[target]
        if objects is not None:
            original = drawn[0] if size == "original" else map_at(cam, prepared, "original")[0]
            if render.heatmap.format == "dicom-pm":
                objects.parametric_map(heatmap, original, label, number)
            objects.collect(target, label, float(result.scores[target]), original)
        explanations.append(
            Explanation(target=prediction(model, target, result.scores), heatmap=heatmap)
        )
    return explanations


def render_volume_result(
    result: ExplainedVolume, model: ModelInfo, render: RenderOptions
) -> ImageResult:
    """One volume's part of the answer: its top predictions and each explanation."""
    prepared = result.prepared
    geometry = prepared.geometry
    objects = None
    if render.heatmap.format in DICOM_FORMATS or render.report is not None:
        how = Explained(render.method, render.layer or model.default_layer, model.name, model.codes)
        objects = VolumeObjects(prepared, how)
    explanations = _explanations(result, model, render, objects)
    depth, height, width = geometry.source_shape
    order = result.order[: min(render.top_k, model.num_classes)]
    answer = ImageResult(
        width=width,
        height=height,
        depth=depth,
        geometry=VolumeGeometry(
            kind="volume",
            orientation=model.orientation or "RAS",
            input_shape=list(geometry.input_size),
            input_spacing=[round(v, 6) for v in geometry.input_spacing],
            input_affine=geometry.input_affine.round(6).tolist(),
            affine=geometry.source_affine.round(6).tolist(),
        ),
        predictions=[prediction(model, int(i), result.scores) for i in order],
        explanations=explanations,
    )
    if prepared.out_of_domain is not None:
        answer.out_of_domain = prepared.out_of_domain
    if objects is not None and render.heatmap.format == "dicom-seg":
        answer.segmentation = objects.segmentation(answer.explanations)
    if objects is not None and render.report is not None:
        answer.report = objects.report(answer.explanations, answer.segmentation)
    if "image" in render.include:
        layer_shape = tuple(int(side) for side in result.cams[0].shape)
        answer.image = _volume_picture(prepared, render.heatmap.size, layer_shape)
    return answer


def _volume_picture(prepared: PreparedVolume, size: str, layer_shape: tuple[int, ...]) -> Picture:
    """include "image": the volume in 8 bits on the heatmaps' grid, as a .nii.gz."""
    geometry = prepared.geometry
    shape: tuple[int, ...]
    if size == "layer":
        shape = layer_shape
        affine = geometry.grid_affine((shape[0], shape[1], shape[2]))
    elif size == "input":
        shape, affine = geometry.input_size, geometry.input_affine
    else:
        shape, affine = geometry.source_shape, geometry.source_affine
    levels = to_uint8(_base_at(prepared, shape, size))
    depth, height, width = levels.shape
    return Picture(
        width=width,
        height=height,
        depth=depth,
        encoding="nifti",
        data=base64.b64encode(write_nifti(levels, affine)).decode("ascii"),
    )
