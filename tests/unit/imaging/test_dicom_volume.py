"""DICOM series and enhanced multi-frame files → volumes: the same voxels and affine as
MONAI's PydicomReader where it follows the standard, the standard where it does not
(slices ordered by position, not InstanceNumber), and a sentence for each refusal."""

from __future__ import annotations

import io
import random
import warnings
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, generate_uid

from service.contract.errors import ErrorCode, InvalidField, PayloadTooLarge
from service.imaging.dicom_volume import (
    multiframe_order,
    read_dicom_series,
    read_dicom_series_sources,
    read_multiframe_volume,
    read_multiframe_volume_source,
)
from service.imaging.volume import Volume
from tests.dicom_series import (
    CORONAL,
    SAGITTAL,
    edited,
    oblique,
    phantom_hu,
    write_ct_series,
)
from tests.helpers import dciodvfy_errors

SHAPE = (16, 12, 8)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _any_size(shape: tuple[int, int, int]) -> None:
    """An ``admit`` that accepts every volume (the budgets are tested on their own)."""


def _monai(files: Sequence[bytes], folder: Path, names: Sequence[str] | None = None) -> Volume:
    """MONAI's ``LoadImage(reader="PydicomReader")`` on a folder holding ``files``."""
    from monai.transforms import LoadImage

    folder.mkdir()
    for number, data in enumerate(files):
        (folder / (names[number] if names else f"{number:03d}.dcm")).write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its optional GPU decoder is not installed
        image = LoadImage(reader="PydicomReader", image_only=True)(str(folder))
    affine = np.asarray(image.affine, dtype=np.float64)
    return Volume(np.asarray(image, dtype=np.float32), affine, "dicom")


def _assert_same(ours: Volume, theirs: Volume) -> None:
    assert ours.voxels.dtype == np.float32 and ours.affine.dtype == np.float64
    assert ours.voxels.shape == theirs.voxels.shape
    np.testing.assert_allclose(ours.voxels, theirs.voxels, rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-4)


def _assert_placed_as_the_files_say(volume: Volume, files: Sequence[bytes]) -> None:
    """Without MONAI: each file's pixels are the slice at its position, and the affine
    maps that slice's voxels where its header places them (nibabel's reading of the one
    file gives the in-plane axes, the pixel values and the origin)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel calls its DICOM readers experimental
        from nibabel.nicom import dicomwrappers

    for data in files:
        wrapper = dicomwrappers.wrapper_from_data(pydicom.dcmread(io.BytesIO(data)))
        single = LPS_TO_RAS @ wrapper.affine  # its axes: row index, column index
        corner = single[:3, 3]
        k = np.linalg.solve(volume.affine[:3, :3], corner - volume.affine[:3, 3])
        np.testing.assert_allclose(k[:2], 0, atol=1e-6)
        slice_k = round(float(k[2]))
        assert abs(k[2] - slice_k) < 1e-6
        np.testing.assert_allclose(volume.affine[:3, 0], single[:3, 1], atol=1e-6)
        np.testing.assert_allclose(volume.affine[:3, 1], single[:3, 0], atol=1e-6)
        stored = wrapper.get_data()  # (rows, columns), rescaled
        np.testing.assert_allclose(volume.voxels[:, :, slice_k], stored.T, atol=1e-3)


SERIES_CASES = {
    "axial": {},
    "spacing_and_origin": {
        "spacing": (0.62, 0.81, 3.3),
        "origin": (112.5, -87.25, 1203.75),
        "signed": True,
    },
    "oblique": {"orientation": oblique(30), "origin": (10.0, -20.0, 35.0)},
    "sagittal": {"orientation": SAGITTAL, "spacing": (0.9, 1.1, 1.5)},
    "coronal": {"orientation": CORONAL, "spacing": (0.5, 0.5, 2.0)},
}


@pytest.mark.parametrize("case", list(SERIES_CASES))
def test_a_series_reads_as_monai_reads_it(case: str, tmp_path: Path) -> None:
    hu = phantom_hu(SHAPE)
    files = write_ct_series(hu, **SERIES_CASES[case])  # type: ignore[arg-type]
    volume = read_dicom_series(files, _any_size)
    _assert_same(volume, _monai(files, tmp_path / "series"))
    np.testing.assert_array_equal(volume.voxels, hu.astype(np.float32))
    assert volume.source == "dicom" and volume.shape == SHAPE
    _assert_placed_as_the_files_say(volume, files)


def test_files_in_any_order_under_any_names(tmp_path: Path) -> None:
    hu = phantom_hu(SHAPE, seed=1)
    files = write_ct_series(hu, orientation=oblique(-50))
    shuffled = list(range(len(files)))
    random.Random(3).shuffle(shuffled)
    sent = [files[n] for n in shuffled]
    # Names that sort against the slice order: MONAI must not depend on them either.
    names = [f"IM{len(files) - n:04d}" for n in shuffled]
    volume = read_dicom_series(sent, _any_size)
    _assert_same(volume, _monai(sent, tmp_path / "series", names))
    np.testing.assert_array_equal(volume.voxels, hu.astype(np.float32))


def test_slices_numbered_against_the_normal_follow_the_normal(tmp_path: Path) -> None:
    """Where MONAI departs from the standard: it stacks by InstanceNumber, so numbers that
    run against the normal (as scanners that start at the head write them) reverse its k
    axis. Ours follows the normal; both describe the same voxels in the same places."""
    hu = phantom_hu(SHAPE, seed=2)
    files = write_ct_series(hu, instance_numbers_descend=True)
    volume = read_dicom_series(files, _any_size)
    theirs = _monai(files, tmp_path / "series")
    np.testing.assert_array_equal(volume.voxels, theirs.voxels[:, :, ::-1])
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1.0, SHAPE[2] - 1
    np.testing.assert_allclose(volume.affine, theirs.affine @ flip, atol=1e-4)
    assert volume.affine[2, 2] > 0  # k runs to the head (RAS+ z) along the normal
    _assert_placed_as_the_files_say(volume, files)


def test_instance_numbers_out_of_place_do_not_move_slices(tmp_path: Path) -> None:
    """Where MONAI departs from the standard: InstanceNumber says nothing of position
    (PS3.3 C.7.6.1.1.1 only asks that it identify the image); MONAI's stack puts the
    slices in its order while taking the affine from the first and last of them."""
    hu = phantom_hu(SHAPE, seed=4)
    files = write_ct_series(hu)
    interleaved = [1, 5, 2, 6, 3, 7, 4, 8]  # acquisition order, say, not place
    files = [edited(data, InstanceNumber=n) for data, n in zip(files, interleaved, strict=True)]
    volume = read_dicom_series(files, _any_size)
    np.testing.assert_array_equal(volume.voxels, hu.astype(np.float32))
    _assert_placed_as_the_files_say(volume, files)
    assert not np.array_equal(_monai(files, tmp_path / "series").voxels, volume.voxels)


def test_a_tilted_gantry_keeps_its_shear(tmp_path: Path) -> None:
    """A CT gantry tilted by 10°: each slice is shifted in its plane by the same step, so
    the affine's slice column is that shear, as MONAI's is (no resampling)."""
    hu = phantom_hu(SHAPE, seed=5)
    files = write_ct_series(hu)
    shift = 2.5 * np.tan(np.radians(10))
    files = [
        edited(data, ImagePositionPatient=[-5.6, -4.2 + k * shift, -30.0 + k * 2.5])
        for k, data in enumerate(files)
    ]
    volume = read_dicom_series(files, _any_size)
    _assert_same(volume, _monai(files, tmp_path / "series"))
    _assert_placed_as_the_files_say(volume, files)


def test_one_series_file_passes_dciodvfy(tmp_path: Path) -> None:
    files = write_ct_series(phantom_hu(SHAPE), orientation=oblique(20), signed=True)
    path = tmp_path / "slice.dcm"
    path.write_bytes(files[3])
    errors, report = dciodvfy_errors(path)
    assert not errors, report
    ds = pydicom.dcmread(path)
    assert (ds.Modality, ds.BodyPartExamined, ds.SOPClassUID) == ("CT", "CHEST", CTImageStorage)


@pytest.fixture(scope="module")
def series() -> list[bytes]:
    return write_ct_series(phantom_hu(SHAPE))


def _refused(files: Sequence[bytes], match: str, index: int = 0) -> None:
    with pytest.raises(InvalidField, match=match) as caught:
        read_dicom_series(files, _any_size, index)
    assert caught.value.code == ErrorCode.INVALID_VOLUME
    assert (caught.value.image, caught.value.field) == (index, f"images[{index}]")


def test_a_file_that_is_no_dicom_is_named(series: list[bytes]) -> None:
    files = [*series[:3], b"not a DICOM file at all" * 20, *series[4:]]
    _refused(files, r"^File 3 of images\[2\] is not a readable DICOM file", index=2)


def test_a_file_cut_short_is_named(series: list[bytes]) -> None:
    files = list(series)
    files[5] = series[5][:700]  # inside the header
    _refused(files, r"^File 5 of images\[0\] ends before any pixel data: it is cut short")


def test_a_missing_slice_is_placed(series: list[bytes]) -> None:
    files = [data for n, data in enumerate(series) if n != 4]
    _refused(
        files,
        r"^A slice is missing from images\[0\]: between file 3 \(at -22.5 mm\) and file 4 "
        r"\(at -17.5 mm along the slice normal\) 1 slice is missing, where the other slices "
        r"are 2.5 mm apart\.$",
    )
    _refused(
        [series[0], series[1], series[7]], r"between file 1 .* and file 2 .* 5 slices are missing"
    )


def test_a_duplicate_slice(series: list[bytes]) -> None:
    files = [*series, edited(series[3], SOPInstanceUID=generate_uid())]
    _refused(
        files,
        r"^Files 3 and 8 of images\[0\] are at the same position \(-22.5 mm along the slice "
        r"normal\); a volume has one slice per position\.",
    )


def test_uneven_spacing(series: list[bytes]) -> None:
    files = [
        edited(data, ImagePositionPatient=[-5.6, -4.2, -30.0 + 2.5 * k + (0.6 if k > 4 else 0)])
        for k, data in enumerate(series)
    ]
    _refused(
        files,
        r"^The slices of images\[0\] are unevenly spaced: 3.1 mm between file 4 \(at -20 mm\) "
        r"and file 5 \(at -16.9 mm along the slice normal\), where most are 2.5 mm apart; a "
        r"volume needs one step between all its slices\.$",
    )


def test_in_plane_shifts_that_change_are_refused(series: list[bytes]) -> None:
    files = list(series)
    files[2] = edited(series[2], ImagePositionPatient=[-4.6, -4.2, -25.0])
    _refused(files, r"^The slices of images\[0\] are not stacked along a straight line")


def test_mixed_orientation(series: list[bytes]) -> None:
    row, column = oblique(0.5)
    files = list(series)
    files[6] = edited(series[6], ImageOrientationPatient=[*row, *column])
    _refused(files, r"^File 6 of images\[0\] is oriented differently from file 0")


def test_mixed_sizes_and_pixel_spacings(series: list[bytes]) -> None:
    other = write_ct_series(phantom_hu((16, 10, 8)))
    files = list(series)
    files[2] = edited(
        other[2], SeriesInstanceUID=pydicom.dcmread(io.BytesIO(series[0])).SeriesInstanceUID
    )
    _refused(files, r"^File 2 of images\[0\] is 16×10 pixels but file 0 is 16×12;")
    files[2] = edited(series[2], PixelSpacing=[0.7, 0.8])
    _refused(files, r"^File 2 of images\[0\] has a PixelSpacing of 0.7 mm × 0.8 mm but file 0")


def test_mixed_series(series: list[bytes]) -> None:
    files = list(series)
    files[1] = edited(series[1], SeriesInstanceUID=generate_uid())
    _refused(files, r"^File 1 of images\[0\] belongs to another series than file 0")


def test_too_few_slices(series: list[bytes]) -> None:
    _refused(series[:1], r"^The volume in images\[0\] has 1 slice; a volume needs at least 2\.$")
    _refused([], r"has 0 slices")


def test_a_slice_without_position_or_with_a_broken_one(series: list[bytes]) -> None:
    files = list(series)
    files[1] = edited(series[1], ImagePositionPatient=None)
    _refused(files, r"^File 1 of images\[0\] has no valid ImagePositionPatient \(3 numbers\)")
    files[1] = edited(series[1], ImageOrientationPatient=[1, 0, 0, 1, 0, 0])
    _refused(files, r"^File 1 of images\[0\] has an ImageOrientationPatient that is not two")


def test_a_multiframe_file_among_a_series(series: list[bytes]) -> None:
    files = [*series, _multiframe(series)]
    _refused(files, r"^File 8 of images\[0\] is a multi-frame DICOM file \(8 frames\)")


class _TooLarge(PayloadTooLarge):
    pass


def _refuse_all(shape: tuple[int, int, int]) -> None:
    raise _TooLarge(f"A volume of {shape} is too large.")


def test_admit_refuses_before_any_pixel_is_decoded(series: list[bytes]) -> None:
    # Pixel data cut short: decoding it would fail, so admit's error shows none was tried.
    files = [*series[:-1], series[-1][:-100]]
    with pytest.raises(_TooLarge, match=r"\(16, 12, 8\)"):
        read_dicom_series(files, _refuse_all)
    _refused(files, r"^The pixel data of file 7 of images\[0\] could not be decoded")
    seen: list[tuple[int, int, int]] = []
    read_dicom_series(series, seen.append)
    assert seen == [SHAPE]


def _multiframe(files: Sequence[bytes]) -> bytes:
    """The files of a series as one Legacy Converted Enhanced CT file (highdicom)."""
    made = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(io.BytesIO(data)) for data in files],
        series_instance_uid=hd.UID(),
        series_number=40,
        sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    buffer = io.BytesIO()
    made.save_as(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("case", ["axial", "oblique", "sagittal"])
def test_a_multiframe_file_reads_as_its_series(case: str) -> None:
    hu = phantom_hu(SHAPE, seed=6)
    files = write_ct_series(hu, instance_numbers_descend=True, **SERIES_CASES[case])  # type: ignore[arg-type]
    volume = read_multiframe_volume(_multiframe(files), _any_size)
    from_series = read_dicom_series(files, _any_size)
    np.testing.assert_array_equal(volume.voxels, from_series.voxels)
    np.testing.assert_allclose(volume.affine, from_series.affine, atol=1e-6)
    assert volume.voxels.dtype == np.float32 and volume.source == "dicom"


def _first_pixel(volume: Volume, k: int) -> np.ndarray:
    """Where the affine puts voxel (0, 0, k), in DICOM's LPS+ mm."""
    return (LPS_TO_RAS @ volume.affine @ np.array([0.0, 0.0, k, 1.0]))[:3]


def test_the_headers_come_in_slice_order() -> None:
    files = write_ct_series(phantom_hu(SHAPE), orientation=oblique(30), signed=True)
    sent = [files[n] for n in (5, 2, 7, 0, 3, 6, 1, 4)]
    volume, headers = read_dicom_series_sources(sent, _any_size)
    same = read_dicom_series(sent, _any_size)
    np.testing.assert_array_equal(volume.voxels, same.voxels)
    np.testing.assert_array_equal(volume.affine, same.affine)
    assert [ds.SOPInstanceUID for ds in headers] == [
        pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID for data in files
    ]
    for k, ds in enumerate(headers):
        assert "PixelData" not in ds
        position = [float(v) for v in ds.ImagePositionPatient]
        np.testing.assert_allclose(_first_pixel(volume, k), position, atol=1e-6)
    data = _multiframe(sent)
    volume, header = read_multiframe_volume_source(data, _any_size)
    np.testing.assert_array_equal(volume.voxels, read_multiframe_volume(data, _any_size).voxels)
    assert "PixelData" not in header
    frames = header.PerFrameFunctionalGroupsSequence
    for k, number in enumerate(multiframe_order(header)):
        place = frames[number].PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose(_first_pixel(volume, k), [float(v) for v in place], atol=1e-6)


def test_each_frame_its_own_rescale(series: list[bytes]) -> None:
    ds = pydicom.dcmread(io.BytesIO(_multiframe(series)))
    shared = ds.SharedFunctionalGroupsSequence[0]
    (transformation,) = shared.PixelValueTransformationSequence
    del shared.PixelValueTransformationSequence
    for number, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        item = pydicom.Dataset()
        item.RescaleSlope, item.RescaleIntercept = "2", str(-1024 * 2 + number)
        item.RescaleType = transformation.RescaleType
        frame.PixelValueTransformationSequence = [item]
    buffer = io.BytesIO()
    ds.save_as(buffer)
    volume = read_multiframe_volume(buffer.getvalue(), _any_size)
    expected = read_dicom_series(series, _any_size).voxels
    for k in range(SHAPE[2]):
        frame = _frame_at(ds, -30 + 2.5 * k)  # highdicom orders the frames its own way
        stored = expected[:, :, k] + 1024
        np.testing.assert_allclose(volume.voxels[:, :, k], 2 * stored - 2048 + frame)


def _frame_at(ds: pydicom.Dataset, z: float) -> int:
    """The number of the frame of ``ds`` (an axial multi-frame) at height ``z``."""
    (found,) = (
        number
        for number, frame in enumerate(ds.PerFrameFunctionalGroupsSequence)
        if abs(float(frame.PlanePositionSequence[0].ImagePositionPatient[2]) - z) < 1e-6
    )
    return found


def _multiframe_moved(files: Sequence[bytes], z: float, to: float) -> tuple[bytes, int, int]:
    """An axial multi-frame file whose frame at height ``z`` is moved to height ``to``;
    and the numbers of the frame moved and of the one that was at ``to``, if any (else -1)."""
    ds = pydicom.dcmread(io.BytesIO(_multiframe(files)))
    moved = _frame_at(ds, z)
    heights = [
        float(frame.PlanePositionSequence[0].ImagePositionPatient[2])
        for frame in ds.PerFrameFunctionalGroupsSequence
    ]
    there = _frame_at(ds, to) if to in heights else -1
    (place,) = ds.PerFrameFunctionalGroupsSequence[moved].PlanePositionSequence
    place.ImagePositionPatient = [-5.6, -4.2, to]
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue(), moved, there


def _multiframe_refused(data: bytes, match: str) -> None:
    with pytest.raises(InvalidField, match=match) as caught:
        read_multiframe_volume(data, _any_size, 1)
    assert caught.value.code == ErrorCode.INVALID_VOLUME
    assert (caught.value.image, caught.value.field) == (1, "images[1]")


def test_multiframe_refusals(series: list[bytes]) -> None:
    data, moved, there = _multiframe_moved(series, -22.5, -25.0)
    first, second = sorted((moved, there))
    _multiframe_refused(
        data, rf"^Frames {first} and {second} of images\[1\] are at the same position \(-25 mm"
    )
    _multiframe_refused(
        _multiframe([data for n, data in enumerate(series) if n != 2]),
        r"^A slice is missing from images\[1\]: between frame \d \(at -27.5 mm\) and frame "
        r"\d \(at -22.5 mm along the slice normal\) 1 slice is missing",
    )
    data, moved, _ = _multiframe_moved(series, -17.5, -17.0)
    _multiframe_refused(
        data, rf"^The slices of images\[1\] are unevenly spaced: .*frame {moved} \(at -17 mm along"
    )
    _multiframe_refused(_multiframe(series[:1]), r"has 1 frame; a multi-frame volume needs")
    _multiframe_refused(b"\0" * 300, r"^Images\[1\] is not a readable DICOM file")
    ds = pydicom.dcmread(io.BytesIO(_multiframe(series)))
    del ds.PerFrameFunctionalGroupsSequence
    buffer = io.BytesIO()
    ds.save_as(buffer)
    _multiframe_refused(buffer.getvalue(), r"has 8 frames but not one per-frame functional group")


def test_multiframe_orientation_must_be_one(series: list[bytes]) -> None:
    ds = pydicom.dcmread(io.BytesIO(_multiframe(series)))
    (orientation,) = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
    del ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
    row, column = oblique(1)
    for number, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        item = pydicom.Dataset()
        item.ImageOrientationPatient = (
            [*row, *column] if number == 4 else orientation.ImageOrientationPatient
        )
        frame.PlaneOrientationSequence = [item]
    buffer = io.BytesIO()
    ds.save_as(buffer)
    _multiframe_refused(buffer.getvalue(), r"^Frame 4 of images\[1\] is oriented differently")


def test_multiframe_admit_comes_before_decoding(series: list[bytes]) -> None:
    data = _multiframe(series)[:-100]
    with pytest.raises(_TooLarge, match=r"\(16, 12, 8\)"):
        read_multiframe_volume(data, _refuse_all)
    _multiframe_refused(data, r"^The pixel data of images\[1\] could not be decoded")


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
def test_a_rescale_that_is_no_number(series: list[bytes]) -> None:
    files = list(series)
    placeholder = b"9.87654321"  # a DS of even length, then overwritten in the bytes
    files[4] = edited(series[4], RescaleSlope=placeholder.decode())
    assert files[4].count(placeholder) == 1
    files[4] = files[4].replace(placeholder, b"not a num!")
    _refused(files, r"^File 4 of images\[0\] has a modality LUT .* that cannot be applied\.$")
    files[4] = edited(series[4], RescaleSlope="nan")
    _refused(files, r"values that are not finite numbers after its rescale slope and intercept")
