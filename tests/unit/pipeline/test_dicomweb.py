"""DICOMweb servers a request may name (service/pipeline/dicomweb.py): the allowed URLs
compared normalised, anything else refused (DICOMweb against a real Orthanc:
tests/process/pacs/test_dicomweb.py)."""

from __future__ import annotations

import pytest

from service.contract.errors import Forbidden, InvalidField
from service.pipeline.dicomweb import DicomWebServers


def test_allowed_urls_are_compared_normalised() -> None:
    servers = DicomWebServers("http://PACS.example:80/dicom-web/, https://b.example/wado")
    assert (
        servers.base("http://pacs.example/dicom-web", "x", "X")
        == "http://PACS.example:80/dicom-web"
    )
    assert servers.base("https://b.example:443/wado/", "x", "X") == "https://b.example/wado"
    for refused in (
        "http://pacs.example:8080/dicom-web",
        "https://pacs.example/dicom-web",
        "http://pacs.example/dicom-web/studies",
        "http://b.example/wado",
    ):
        with pytest.raises(Forbidden):
            servers.base(refused, "x", "X")
    with pytest.raises(InvalidField):
        servers.base("file:///etc/passwd", "x", "X")
    with pytest.raises(Forbidden):
        DicomWebServers("").base("http://pacs.example/dicom-web", "x", "X")
