"""The size a compressed DICOM frame declares in its own header, read before decoding.

A DICOM file's Rows × Columns is checked against the budget, but an encapsulated
frame is decoded at the size *its codestream* declares: a 512 × 512 header can
carry a JPEG whose SOF says 65535 × 65535, and the decoder allocates that before
anyone looks. These readers find the declared size in a few hundred bytes, so a
frame that disagrees with its dataset is refused without being decoded.
"""

from __future__ import annotations

import struct

# Start-of-frame markers that carry the frame size: JPEG baseline, extended,
# progressive, lossless (0xC0-0xCF less DHT 0xC4, JPG 0xC8, DAC 0xCC) and JPEG-LS.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
# Markers without a length field.
_STANDALONE = {0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9}
_J2K_START = b"\xff\x4f\xff\x51"  # SOC then SIZ
# How far into a JP2 file (boxes before the codestream) the codestream may start.
_JP2_SEARCH = 64 * 1024


def declared_size(frame: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a JPEG, JPEG-LS or JPEG 2000 frame's header; None when
    the frame is in none of those (RLE: its decoder uses the dataset's size) or has
    no readable header (the decoder will then fail on its own)."""
    if frame.startswith(b"\xff\xd8"):
        return _jpeg_size(frame)
    start = frame.find(_J2K_START, 0, _JP2_SEARCH)
    if start >= 0:
        return _j2k_size(frame, start)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _STANDALONE:
            position += 2
            continue
        (length,) = struct.unpack_from(">H", data, position + 2)
        if marker in _SOF:
            if position + 9 > len(data):
                return None
            height, width = struct.unpack_from(">HH", data, position + 5)
            return width, height
        if marker == 0xDA:  # start of scan before any frame header
            return None
        position += 2 + length
    return None


def _j2k_size(data: bytes, start: int) -> tuple[int, int] | None:
    # SIZ: Lsiz, Rsiz (2 bytes each), then Xsiz, Ysiz, XOsiz, YOsiz (4 bytes each).
    offset = start + 4 + 4
    if offset + 16 > len(data):
        return None
    xsiz, ysiz, x0, y0 = struct.unpack_from(">IIII", data, offset)
    return xsiz - x0, ysiz - y0
