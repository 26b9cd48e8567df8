"""Write the example images of the repository (``examples/``) from the phantom generator.

    python -m tools.demo_model.examples [--out examples]

Each image comes with its findings and boxes in ``findings.json``, and
``request.json`` is a ready ``POST /v1/explain`` body for the first one.
``phantom_nodule.dcm`` is the first scene as a 12-bit DICOM radiograph stored
the way many CR/DX files are (MONOCHROME1, a rescale, a window), with a
made-up patient: a viewer, and the service, show it like the PNG.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from service.demo.phantom import sample_phantom
from service.imaging.values import to_uint8

# (name, seed, width, height): square ones like the training data, and odd
# non-square sizes to show that heatmaps follow any pixel grid.
EXAMPLES = (
    ("phantom_nodule", 2, 384, 384),
    ("phantom_mass_tube", 3, 384, 384),
    ("phantom_opacity", 7, 512, 400),
    ("phantom_four_findings", 37, 448, 448),
    ("phantom_odd_size", 25, 517, 389),
)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="PNG")
    return buffer.getvalue()


# (name, seed, width, height) of the DICOM example: the nodule scene, not square.
DICOM_EXAMPLE = ("phantom_nodule", 2, 420, 380)
_RESCALE_INTERCEPT = -1024


def _dicom(image: np.ndarray, name: str) -> bytes:
    """``image`` in [0, 1] as a 12-bit MONOCHROME1 CR image with a rescale and a window
    (displayed, it is ``image`` again); UIDs derived from ``name`` (same file each run)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def uid(kind: str) -> str:
        return str(generate_uid(entropy_srcs=[f"gradcam-service example {name} {kind}"]))

    stored = np.round((1.0 - image) * 4095).astype(np.uint16)  # MONOCHROME1: white = 0
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography
    meta.MediaStorageSOPInstanceUID = uid("instance")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, uid("instance")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
    ds.PatientName, ds.PatientID = "PHANTOM^NODULE", "GCS-0002"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20261201", "120000", "1", ""
    ds.StudyDescription, ds.SeriesDescription = "Phantom chest", "PA (synthetic)"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.ReferringPhysicianName, ds.PatientOrientation = "", ["L", "F"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    # Stored 0..4095 → -1024..3071 after the rescale; the window shows all of it, inverted.
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _RESCALE_INTERCEPT, 1, "US"
    ds.WindowCenter, ds.WindowWidth = _RESCALE_INTERCEPT + 2048, 4096
    ds.PixelData = stored.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_examples(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    findings = {}
    for name, seed, width, height in EXAMPLES:
        phantom = sample_phantom(np.random.default_rng(seed), width, height)
        (out / f"{name}.png").write_bytes(_png(phantom.image))
        findings[f"{name}.png"] = {
            "width": width,
            "height": height,
            "findings": [
                {"kind": f.kind, "box": [round(v, 1) for v in f.box]} for f in phantom.findings
            ],
        }
    name, seed, width, height = DICOM_EXAMPLE
    phantom = sample_phantom(np.random.default_rng(seed), width, height)
    (out / f"{name}.dcm").write_bytes(_dicom(phantom.image, name))
    findings[f"{name}.dcm"] = {
        "width": width,
        "height": height,
        "findings": [
            {"kind": f.kind, "box": [round(v, 1) for v in f.box]} for f in phantom.findings
        ],
    }
    (out / "findings.json").write_text(json.dumps(findings, indent=2) + "\n")
    first = (out / f"{EXAMPLES[0][0]}.png").read_bytes()
    request = {
        "images": [base64.b64encode(first).decode("ascii")],
        "top_k": 4,
        "heatmap": {"format": "overlay", "size": "original"},
    }
    (out / "request.json").write_text(json.dumps(request) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples"))
    write_examples(parser.parse_args().out)


if __name__ == "__main__":
    main()
