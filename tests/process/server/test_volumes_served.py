"""Volumes through the real server: a MONAI 3-D DenseNet served from a models file next to
the 2-D demo model. A NIfTI file (JSON, or the file itself), a DICOM series sent as its
instances and an enhanced multi-frame DICOM are explained; the maps equal MONAI's
GradCAM on MONAI's own pipeline (at the layer grid, and at the file's grid as MONAI
inverts it); and every kind of bad volume gets its 4xx."""

from __future__ import annotations

import base64
import gzip
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from tests.dicom_series import write_ct_series
from tests.helpers import LiveServer, ServerFactory, dciodvfy_errors, encode, phantom_png
from tests.volume_models import (
    DICOM_ORIGIN,
    DICOM_SPACING,
    INPUT_SIZE,
    LAYER,
    SPACING,
    WINDOW,
    ct_phantom,
    network,
    ras_affine,
    write_models,
)

nibabel = pytest.importorskip("nibabel")
monai_nets = pytest.importorskip("monai.networks.nets")
monai_transforms = pytest.importorskip("monai.transforms")
monai_visualize = pytest.importorskip("monai.visualize")
safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("volumes")
    write_models(folder)
    return folder


@pytest.fixture(scope="module")
def served(module_live_server: ServerFactory, folder: Path) -> Iterator[LiveServer]:
    yield module_live_server(models_file=folder / "models.toml", out_of_domain="refuse")


def _explain(served: LiveServer, images: list[Any], **fields: Any) -> requests.Response:
    return requests.post(f"{served.url}/v1/explain", json={"images": images, **fields}, timeout=120)


def _monai_pipeline() -> Any:
    t = monai_transforms
    return t.Compose(
        [
            t.LoadImage(image_only=True),
            t.EnsureChannelFirst(),
            t.Orientation("RAS"),
            t.Spacing(pixdim=SPACING),
            t.ScaleIntensityRange(*WINDOW, 0.0, 1.0, clip=True),
            t.Resize(INPUT_SIZE),
        ]
    )


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_the_model_detail_says_it_takes_volumes(served: LiveServer) -> None:
    detail = requests.get(f"{served.url}/v1/models/ct3d", timeout=10).json()
    assert detail["input_size"] == list(INPUT_SIZE)
    assert detail["window"] == list(WINDOW) and detail["spacing"] == list(SPACING)
    assert detail["orientation"] == "RAS"
    layers = requests.get(f"{served.url}/v1/models/ct3d/layers", timeout=10).json()
    layer = next(layer for layer in layers["layers"] if layer["name"] == LAYER)
    assert [layer["depth"], layer["height"], layer["width"]] == [3, 3, 2]
    image_layers = requests.get(f"{served.url}/v1/models/phantom/layers", timeout=10).json()
    assert all("depth" not in layer for layer in image_layers["layers"])


def test_a_nifti_map_equals_monai_s_gradcam(served: LiveServer, folder: Path) -> None:
    """At the layer grid (the engine's map) and at the file's own grid (MONAI's map at
    the input size, taken back by MONAI's inverse of its pipeline)."""
    data = encode((folder / "ct.nii.gz").read_bytes())
    layer = _explain(served, [data], targets=[1], heatmap={"format": "array", "size": "layer"})
    assert layer.status_code == 200, layer.text
    answer = layer.json()
    assert answer["random_weights"] is False
    result = answer["results"][0]
    assert [result["depth"], result["height"], result["width"]] == [56, 48, 24]
    assert result["geometry"]["kind"] == "volume"
    heat = np.asarray(result["explanations"][0]["heatmap"]["values"])
    pipeline = _monai_pipeline()
    tensor = pipeline(str(folder / "ct.nii.gz"))
    net = network()
    for parameter in net.parameters():
        parameter.requires_grad_(True)
    # MONAI's default postprocessing maps (min, max) to (1, 0), for its colour maps:
    # the raw upsampled map is what is compared.
    cam = monai_visualize.GradCAM(net, target_layers=LAYER, postprocessing=lambda x: x)
    theirs = cam.compute_map(tensor[None], class_idx=1)[0, 0].detach().numpy()
    assert heat.shape == theirs.shape == (3, 3, 2)
    assert _pearson(heat, theirs) >= 0.999

    original = _explain(
        served, [data], targets=[1], heatmap={"format": "nifti", "size": "original"}
    )
    assert original.status_code == 200, original.text
    written = original.json()["results"][0]["explanations"][0]["heatmap"]
    nifti = nibabel.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(written["data"])))
    np.testing.assert_allclose(nifti.affine, ras_affine(), atol=1e-5)
    assert nifti.shape == (56, 48, 24)
    upsampled = cam(tensor[None], class_idx=1)[0]  # MONAI's map at the input size
    tensor.array = upsampled.detach()
    inverted = pipeline.inverse(tensor)[0].numpy()
    assert _pearson(nifti.get_fdata(), inverted) >= 0.99


def test_the_series_the_file_and_the_multiframe_give_one_map(
    served: LiveServer, folder: Path
) -> None:
    """The same voxels as a NIfTI file, as a DICOM series sent as its instances (in a
    shuffled order) and as one enhanced multi-frame file: one map."""
    highdicom = pytest.importorskip("highdicom")
    pydicom = pytest.importorskip("pydicom")
    files = write_ct_series(ct_phantom(), DICOM_SPACING, DICOM_ORIGIN, signed=True)
    shuffled = [files[i] for i in np.random.default_rng(5).permutation(len(files))]
    datasets = [pydicom.dcmread(io.BytesIO(f)) for f in files]
    enhanced = highdicom.legacy.LegacyConvertedEnhancedCTImage(
        datasets,
        series_instance_uid=highdicom.UID(),
        series_number=9,
        sop_instance_uid=highdicom.UID(),
        instance_number=1,
    )
    buffer = io.BytesIO()
    enhanced.save_as(buffer)
    heatmap = {"format": "array", "size": "input"}
    maps = []
    for given in (
        encode((folder / "ct.nii.gz").read_bytes()),
        {"series": [encode(f) for f in shuffled]},
        encode(buffer.getvalue()),
    ):
        response = _explain(served, [given], targets=[1], heatmap=heatmap)
        assert response.status_code == 200, response.text[:400]
        result = response.json()["results"][0]
        maps.append(np.asarray(result["explanations"][0]["heatmap"]["values"]))
    assert maps[0].shape == INPUT_SIZE
    for other in maps[1:]:
        np.testing.assert_allclose(other, maps[0], atol=2e-3)


def test_a_series_gets_its_parametric_map_segmentation_and_report(
    served: LiveServer, tmp_path: Path
) -> None:
    """One request for a CT series (its instances): a multi-frame Parametric Map per
    class with one frame per slice, one Segmentation, an SR whose peak is a 3-D point;
    each dciodvfy-clean, all in the series' study and Frame of Reference."""
    pydicom = pytest.importorskip("pydicom")
    files = write_ct_series(ct_phantom(), DICOM_SPACING, DICOM_ORIGIN, signed=True)
    source = pydicom.dcmread(io.BytesIO(files[0]))
    series = {"series": [encode(f) for f in files]}
    objects = []
    for fmt in ("dicom-pm", "dicom-seg"):
        response = _explain(
            served, [series], targets=[[0, 1]], heatmap={"format": fmt}, report="dicom-sr"
        )
        assert response.status_code == 200, response.text[:400]
        result = response.json()["results"][0]
        for explanation in result["explanations"]:
            heatmap = explanation["heatmap"]
            assert "reason" not in heatmap, heatmap.get("reason")
            if fmt == "dicom-pm":
                objects.append(heatmap["data"])
            else:
                assert heatmap["segment"] in (1, 2)
        if fmt == "dicom-seg":
            objects.append(result["segmentation"]["data"])
        objects.append(result["report"]["data"])
    read = [pydicom.dcmread(io.BytesIO(base64.b64decode(data))) for data in objects]
    parametric_map = "1.2.840.10008.5.1.4.1.1.30"
    maps = [ds for ds in read if ds.SOPClassUID == parametric_map]
    assert len(maps) == 2 and all(int(ds.NumberOfFrames) == 24 for ds in maps)
    assert {ds.Modality for ds in read if ds.SOPClassUID != parametric_map} == {"SEG", "SR"}
    for n, ds in enumerate(read):
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        if ds.Modality != "SR":
            assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
        path = tmp_path / f"object{n}.dcm"
        path.write_bytes(base64.b64decode(objects[n]))
        errors, report = dciodvfy_errors(path)
        assert not errors, report
    reports = [ds for ds in read if ds.Modality == "SR"]
    assert "SCOORD3D" in str(reports[0])


def test_a_nifti_volume_gets_no_dicom_objects_and_says_why(
    served: LiveServer, folder: Path
) -> None:
    response = _explain(
        served, [encode((folder / "ct.nii.gz").read_bytes())], heatmap={"format": "dicom-pm"}
    )
    assert response.status_code == 200, response.text[:400]
    heatmap = response.json()["results"][0]["explanations"][0]["heatmap"]
    assert "data" not in heatmap and "NIfTI" in heatmap["reason"]


def test_the_image_door_gives_back_the_nifti_file(served: LiveServer, folder: Path) -> None:
    """curl --data-binary @ct.nii.gz -H 'Content-Type: application/gzip' '...?format=nifti'"""
    response = requests.post(
        f"{served.url}/v1/explain?format=nifti&size=input&target=nodule",
        data=(folder / "ct.nii.gz").read_bytes(),
        headers={"Content-Type": "application/gzip"},
        timeout=60,
    )
    assert response.status_code == 200, response.text[:400]
    assert response.headers["Content-Type"] == "application/gzip"
    assert response.headers["X-Gradcam-Model"] == "ct3d"
    image = nibabel.Nifti1Image.from_bytes(gzip.decompress(response.content))
    assert image.shape == INPUT_SIZE


def test_the_picture_is_three_slices_through_the_peak(served: LiveServer, folder: Path) -> None:
    response = _explain(
        served,
        [encode((folder / "ct.nii.gz").read_bytes())],
        heatmap={"format": "overlay", "size": "original"},
    )
    assert response.status_code == 200, response.text[:400]
    heatmap = response.json()["results"][0]["explanations"][0]["heatmap"]
    picture = Image.open(io.BytesIO(base64.b64decode(heatmap["data"])))
    assert picture.mode == "RGB" and picture.width > 2 * picture.height
    peak = heatmap["peak"]
    affine = np.asarray(heatmap["affine"])
    mm = affine[:3, :3] @ np.asarray(peak["voxel"]) + affine[:3, 3]
    np.testing.assert_allclose(mm, peak["mm"], atol=1e-2)


@pytest.mark.parametrize("size", ["layer", "input", "original"])
def test_the_volume_comes_back_on_the_map_s_grid(
    served: LiveServer, folder: Path, size: str
) -> None:
    """include "image": the windowed volume in 8 bits as a .nii.gz, on the same grid as
    the nifti map (what the web page lays the map over)."""
    response = _explain(
        served,
        [encode((folder / "ct.nii.gz").read_bytes())],
        heatmap={"format": "nifti", "size": size},
        include=["image"],
    )
    assert response.status_code == 200, response.text[:400]
    result = response.json()["results"][0]
    assert result["image"]["encoding"] == "nifti"

    def read(data: str) -> Any:
        return nibabel.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(data)))

    volume = read(result["image"]["data"])
    heat = read(result["explanations"][0]["heatmap"]["data"])
    assert volume.shape == heat.shape
    assert volume.get_data_dtype() == np.uint8
    np.testing.assert_allclose(volume.affine, heat.affine, atol=1e-5)
    if size == "original":  # the body is soft tissue, 40 HU: (40 + 1000) / 1400 of 255
        levels = np.asarray(volume.dataobj)
        assert abs(int(levels[28, 24, 4]) - round(1040 / 1400 * 255)) <= 12
        assert int(levels[1, 1, 1]) <= 8  # air


def test_the_open_inference_protocol_heatmap_is_n_d_h_w(served: LiveServer, folder: Path) -> None:
    body: dict[str, Any] = {
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "data": [encode((folder / "ct.nii.gz").read_bytes())],
            }
        ],
        "outputs": [{"name": "heatmap"}, {"name": "probabilities"}],
        "parameters": {"heatmap_size": "input"},
    }
    response = requests.post(f"{served.url}/v2/models/ct3d/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text[:400]
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["heatmap"]["shape"] == [1, *INPUT_SIZE]
    assert outputs["heatmap"]["datatype"] == "FP32"


def _huge_header() -> bytes:
    """A NIfTI header declaring 4096³ int16 voxels (128 GiB), and no data."""
    image = nibabel.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    image.header.set_data_shape((4096, 4096, 4096))
    return gzip.compress(image.header.binaryblock + b"\0\0\0\0")


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("png to the volume model", 422, "volume_required"),
        ("one dicom slice to the volume model", 422, "volume_required"),
        ("nifti to the image model", 422, "image_required"),
        ("series to the image model", 422, "image_required"),
        ("nifti format from the image model", 422, "invalid_field"),
        ("30 bytes of a nifti file", 422, "volume_required"),
        ("broken nifti header", 422, "invalid_volume"),
        ("truncated nifti", 422, "invalid_volume"),
        ("series with a missing slice", 422, "invalid_volume"),
        ("declared 4096 cubed", 413, "image_too_large"),
        ("faithfulness of a volume", 422, "invalid_field"),
        ("dicom-sc of a volume", 422, "invalid_field"),
        ("an MR series for a CT model", 422, "out_of_domain"),
    ],
)
def test_bad_volumes_get_their_4xx(
    served: LiveServer, folder: Path, case: str, status: int, code: str
) -> None:
    nifti = (folder / "ct.nii.gz").read_bytes()
    series = write_ct_series(ct_phantom()[:, :, :6], DICOM_SPACING, DICOM_ORIGIN, signed=True)
    bodies: dict[str, dict[str, Any]] = {
        "png to the volume model": {"images": [encode(phantom_png(1, 64, 64))]},
        "one dicom slice to the volume model": {"images": [encode(series[0])]},
        "nifti to the image model": {"model": "phantom", "images": [encode(nifti)]},
        "series to the image model": {
            "model": "phantom",
            "images": [{"series": [encode(f) for f in series]}],
        },
        "nifti format from the image model": {
            "model": "phantom",
            "images": [encode(phantom_png(1, 64, 64))],
            "heatmap": {"format": "nifti"},
        },
        "30 bytes of a nifti file": {"images": [encode(nifti[:30])]},
        "broken nifti header": {"images": [encode(_unknown_datatype(nifti))]},
        "truncated nifti": {"images": [encode(gzip.compress(gzip.decompress(nifti)[:5000]))]},
        "series with a missing slice": {
            "images": [{"series": [encode(f) for i, f in enumerate(series) if i != 3]}]
        },
        "declared 4096 cubed": {"images": [encode(_huge_header())]},
        "faithfulness of a volume": {"images": [encode(nifti)], "include": ["faithfulness"]},
        "dicom-sc of a volume": {"images": [encode(nifti)], "heatmap": {"format": "dicom-sc"}},
        "an MR series for a CT model": {
            "images": [{"series": [encode(_as_mr(f)) for f in series]}]
        },
    }
    body = bodies[case]
    response = requests.post(f"{served.url}/v1/explain", json=body, timeout=60)
    assert response.status_code == status, response.text[:400]
    error = response.json()["error"]
    assert error["code"] == code, error
    assert requests.get(f"{served.url}/healthz", timeout=5).status_code == 200


def _unknown_datatype(nifti: bytes) -> bytes:
    raw = bytearray(gzip.decompress(nifti))
    raw[70:72] = (999).to_bytes(2, "little")  # datatype: no such NIfTI code
    return gzip.compress(bytes(raw))


def _as_mr(data: bytes) -> bytes:
    from tests.dicom_series import edited

    return edited(data, Modality="MR")


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"])
def test_every_method_explains_a_volume(served: LiveServer, folder: Path, method: str) -> None:
    response = _explain(
        served,
        [encode((folder / "ct.nii.gz").read_bytes())],
        method=method,
        targets=[1],
        heatmap={"format": "array", "size": "layer"},
    )
    assert response.status_code == 200, response.text[:400]
    answer = response.json()
    assert answer["method"] == method
    heatmap = answer["results"][0]["explanations"][0]["heatmap"]
    values = np.asarray(heatmap["values"])
    assert values.shape == (3, 3, 2) and values.min() >= 0 and values.max() <= 1
    assert heatmap["raw_max"] > 0
