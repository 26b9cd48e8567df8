"""NIfTI files in and out: told apart by content, read as MONAI reads them, refused with
the reason, and cheap to refuse (the header first, the data never past its size)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

nibabel = pytest.importorskip("nibabel")

from service.contract.errors import ErrorCode, InvalidField, PayloadTooLarge  # noqa: E402
from service.imaging.nifti import is_nifti, read_nifti, write_nifti  # noqa: E402

AFFINE = np.array([[-0.7, 0, 0, 90], [0, 0.8, 0, -100], [0, 0, 2.5, 30], [0, 0, 0, 1.0]])


def _nifti(voxels: np.ndarray, gz: bool = True, two: bool = False, **header: float) -> bytes:
    kind = nibabel.Nifti2Image if two else nibabel.Nifti1Image
    image = kind(voxels, AFFINE)
    for key, value in header.items():
        image.header[key] = value
    raw = image.to_bytes()
    return gzip.compress(raw) if gz else raw


def _admit_all(shape: tuple[int, int, int]) -> None:
    pass


def _volume() -> np.ndarray:
    return np.random.default_rng(1).integers(-1024, 2000, (9, 8, 7)).astype(np.int16)


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("two", [False, True])
def test_nifti_is_told_by_content(gz: bool, two: bool) -> None:
    assert is_nifti(_nifti(_volume(), gz=gz, two=two))


@pytest.mark.parametrize(
    "data",
    [b"", b"\x89PNG\r\n\x1a\n" + bytes(600), gzip.compress(b"not a volume" * 100), bytes(1000)],
)
def test_other_files_are_not_nifti(data: bytes) -> None:
    assert not is_nifti(data)


@pytest.mark.parametrize("gz", [True, False])
def test_read_as_monai_reads_it(gz: bool, tmp_path) -> None:  # type: ignore[no-untyped-def]
    transforms = pytest.importorskip("monai.transforms")
    data = _nifti(_volume(), gz=gz, scl_slope=0.5, scl_inter=-10)
    path = tmp_path / ("v.nii.gz" if gz else "v.nii")
    path.write_bytes(data)
    expected = transforms.LoadImage(image_only=True)(str(path))
    volume = read_nifti(data, _admit_all)
    assert volume.voxels.dtype == np.float32 and volume.source == "nifti"
    np.testing.assert_allclose(volume.voxels, expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(volume.affine, expected.affine.numpy(), atol=1e-6)
    assert volume.spacing == pytest.approx((0.7, 0.8, 2.5))


def test_a_time_axis_of_one_is_a_volume() -> None:
    volume = read_nifti(_nifti(_volume()[..., None]), _admit_all)
    assert volume.shape == (9, 8, 7)


def _refusal(data: bytes) -> str:
    with pytest.raises(InvalidField) as caught:
        read_nifti(data, _admit_all, index=2)
    assert caught.value.code == ErrorCode.INVALID_VOLUME and caught.value.image == 2
    return caught.value.message


def test_refusals_name_the_problem() -> None:
    good = _nifti(_volume(), gz=False)
    assert "header is broken" in _refusal(good[:200] + bytes(148) + good[348:])
    assert "truncated" in _refusal(good[: len(good) - 10])
    assert "truncated" in _refusal(gzip.compress(good)[:-40]) or "gzip" in _refusal(
        gzip.compress(good)[:-40]
    )
    assert "not one 3-D volume" in _refusal(_nifti(np.zeros((5, 5, 5, 2), np.int16)))
    assert "not one 3-D volume" in _refusal(_nifti(np.zeros((5, 5), np.int16)))
    assert "not real numbers" in _refusal(_nifti(np.zeros((4, 4, 4), np.complex64)))
    assert "no finite voxel" in _refusal(_nifti(np.full((4, 4, 4), np.nan, np.float32)))


def test_the_shape_is_admitted_before_any_voxel_is_read() -> None:
    """A file cut short after its header still gets the admit's 413, not a read error."""
    seen: list[tuple[int, int, int]] = []

    def refuse(shape: tuple[int, int, int]) -> None:
        seen.append(shape)
        raise PayloadTooLarge("too large", code=ErrorCode.IMAGE_TOO_LARGE)

    header_only = _nifti(_volume(), gz=False)[:352]
    with pytest.raises(PayloadTooLarge):
        read_nifti(gzip.compress(header_only), refuse)
    assert seen == [(9, 8, 7)]


def test_a_gzip_bomb_is_decompressed_only_as_far_as_its_header_declares() -> None:
    """A small declared volume followed by 64 MB of zeros: read in a blink, only the
    declared bytes inflated."""
    raw = _nifti(np.ones((4, 4, 4), np.int16), gz=False)
    bomb = gzip.compress(raw + bytes(64 * 1024 * 1024), compresslevel=1)
    volume = read_nifti(bomb, _admit_all)
    assert volume.shape == (4, 4, 4) and float(volume.voxels.max()) == 1.0


def test_non_finite_voxels_take_the_nearest_finite_value() -> None:
    voxels = np.linspace(-5, 5, 64, dtype=np.float32).reshape(4, 4, 4)
    voxels[0, 0, 0], voxels[1, 1, 1], voxels[2, 2, 2] = np.nan, np.inf, -np.inf
    read = read_nifti(_nifti(voxels), _admit_all).voxels
    assert np.isfinite(read).all()
    assert read[1, 1, 1] == voxels[np.isfinite(voxels)].max()
    assert read[2, 2, 2] == read[0, 0, 0] == voxels[np.isfinite(voxels)].min()


def test_written_maps_carry_their_affine() -> None:
    values = np.random.default_rng(2).random((6, 5, 4)).astype(np.float32)
    data = write_nifti(values, AFFINE)
    assert data[:2] == b"\x1f\x8b" and is_nifti(data)
    back = read_nifti(data, _admit_all)
    np.testing.assert_array_equal(back.voxels, values)
    np.testing.assert_allclose(back.affine, AFFINE, atol=1e-6)
