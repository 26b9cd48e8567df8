"""DICOMweb in and out: an image named by UIDs on a DICOMweb server instead of sent
as bytes (WADO-RS), and the DICOM results stored back (STOW-RS).

Which servers may be called is a setting (``GRADCAM_DICOMWEB_SERVERS``, base URLs
such as ``http://pacs:8042/dicom-web``), empty by default: the service is never a
proxy to anywhere a request names. A URL is allowed when it is one of those bases
(scheme, host, port and path, compared after normalisation); UIDs are checked to be
UIDs before they go into a path; redirects are not followed; every call has the
request's remaining time as its timeout, and a fetched instance may be no larger
than a request body.
"""

from __future__ import annotations

import email.parser
import email.policy
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from service.contract.errors import (
    BadGateway,
    DeadlineExceeded,
    ErrorCode,
    Forbidden,
    InvalidField,
    PayloadTooLarge,
)

# PS3.5 9.1: digits and dots, components without leading zeros, at most 64 characters.
# Matched whole (fullmatch): "$" would let a trailing newline through.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_CHUNK = 1 << 16


@dataclass(frozen=True)
class InstanceRef:
    """One instance on a DICOMweb server."""

    url: str
    study: str
    series: str
    instance: str | None  # None: the whole series


@dataclass(frozen=True)
class Stored:
    """What a STOW-RS call did with one object."""

    ok: bool
    message: str


def _normalised(url: str) -> str:
    """``scheme://host:port/path``; ``ValueError`` for a URL that cannot be parsed (a port
    out of range or not a number, a broken IPv6 literal)."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return f"{scheme}://{(parts.hostname or '').lower()}:{port}{parts.path.rstrip('/')}"


class DicomWebServers:
    """The DICOMweb servers this service may call (none by default)."""

    def __init__(self, allowed: str) -> None:
        # Settings.from_env has checked that each one parses.
        self._allowed = {
            _normalised(url): url.strip().rstrip("/")
            for url in allowed.replace(",", " ").split()
            if url.strip()
        }

    def base(self, url: str, where: str, subject: str, image: int | None = None) -> str:
        """``url`` as an allowed base URL, or ``Forbidden``; ``subject`` starts the message
        ("Image 3", "The store URL") and ``where`` is the field."""
        try:
            parts = urlsplit(url.strip())
            if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
                raise ValueError("not an http(s) URL with a host")
            normalised = _normalised(url)
        except ValueError:
            raise InvalidField(
                f"{subject}: '{url[:200]}' is not a valid http(s) URL (scheme, "
                "host, and a port from 1 to 65535 if given).",
                field=where,
                image=image,
            ) from None
        found = self._allowed.get(normalised)
        if found is None:
            allowed = ", ".join(self._allowed.values()) or "none are configured"
            raise Forbidden(
                f"{subject}: this service may not call {url[:200]}; the DICOMweb "
                f"servers it may call are set by GRADCAM_DICOMWEB_SERVERS "
                f"({allowed}).",
                code=ErrorCode.DICOMWEB_NOT_ALLOWED,
                field=where,
                image=image,
            )
        return found


def _check_uid(value: str, what: str, index: int) -> str:
    if len(value) > 64 or not _UID.fullmatch(value):
        raise InvalidField(
            f"Image {index}: {what} '{value[:80]}' is not a DICOM UID.",
            field=f"images[{index}].dicomweb.{what}",
            image=index,
        )
    return value


def _session() -> Any:
    import requests

    session = requests.Session()
    session.trust_env = False  # no proxy from the environment: the allow-list is the rule
    return session


def fetch_instance(
    ref: InstanceRef, servers: DicomWebServers, index: int, limit_bytes: int, timeout_s: float
) -> bytes:
    """The Part 10 bytes of ``ref`` (WADO-RS, any transfer syntax)."""
    return fetch_dicomweb(ref, servers, index, limit_bytes, timeout_s)[0]


def fetch_dicomweb(
    ref: InstanceRef, servers: DicomWebServers, index: int, limit_bytes: int, timeout_s: float
) -> list[bytes]:
    """The Part 10 files of ``ref``: one instance, or every instance of its series (WADO-RS,
    any transfer syntax), ``limit_bytes`` at most in all."""
    import requests

    # requests' timeout bounds each read; this bounds them all (a server that drips).
    deadline = time.monotonic() + timeout_s
    where = f"images[{index}].dicomweb"
    base = servers.base(ref.url, f"{where}.url", f"Image {index}", index)
    path = "/".join(
        (
            f"studies/{_check_uid(ref.study, 'study', index)}",
            f"series/{_check_uid(ref.series, 'series', index)}",
            *([f"instances/{_check_uid(ref.instance, 'instance', index)}"] if ref.instance else []),
        )
    )
    what = f"instance {ref.instance} in series" if ref.instance else "series"
    try:
        with (
            _session() as session,
            session.get(
                f"{base}/{path}",
                headers={"Accept": _ACCEPT},
                stream=True,
                allow_redirects=False,
                timeout=max(timeout_s, 0.1),
            ) as response,
        ):
            if response.status_code == 404:
                raise InvalidField(
                    f"Image {index}: {base} has no {what} {ref.series} of study {ref.study}.",
                    code=ErrorCode.DICOMWEB_NOT_FOUND,
                    image=index,
                    field=where,
                )
            if response.status_code != 200:
                raise BadGateway(
                    f"Image {index}: {base} answered {response.status_code} to "
                    "the WADO-RS retrieve.",
                    code=ErrorCode.DICOMWEB_FAILED,
                    image=index,
                )
            body = bytearray()
            for chunk in response.iter_content(_CHUNK):
                body += chunk
                if time.monotonic() > deadline:
                    raise DeadlineExceeded(
                        f"Image {index}: fetching it from {base} took longer "
                        "than the request's deadline."
                    )
                if len(body) > limit_bytes:
                    raise PayloadTooLarge(
                        f"Image {index}: the {'instance' if ref.instance else 'series'} on "
                        f"{base} is larger than {limit_bytes} bytes.",
                        code=ErrorCode.IMAGE_TOO_LARGE,
                        image=index,
                        field=where,
                    )
            content_type = response.headers.get("Content-Type", "")
    except requests.RequestException as error:
        raise BadGateway(
            f"Image {index}: {base} could not be reached ({type(error).__name__}).",
            code=ErrorCode.DICOMWEB_UNREACHABLE,
            image=index,
        ) from None
    parts = _parts(content_type, bytes(body))
    if not parts:
        raise BadGateway(
            f"Image {index}: {base} sent no DICOM part in its answer.",
            code=ErrorCode.DICOMWEB_FAILED,
            image=index,
        )
    return parts


def _parts(content_type: str, body: bytes) -> list[bytes]:
    """The bodies of a ``multipart/related`` answer (or the body itself, if not multipart)."""
    if not content_type.lower().startswith("multipart/"):
        return [body] if body else []
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    found = []
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        if payload:
            found.append(bytes(payload))
    return found


def store(
    objects: Sequence[tuple[str, bytes]], url: str, servers: DicomWebServers, timeout_s: float
) -> list[Stored]:
    """STOW-RS ``objects`` (SOP Instance UID, Part 10 bytes) to ``url``, in one call."""
    import requests

    base = servers.base(url, "store.url", "The store URL")
    boundary = f"gradcam-{secrets.token_hex(12)}"
    body = bytearray()
    for _, data in objects:
        body += (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode()
        body += data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    try:
        with _session() as session:
            response = session.post(
                f"{base}/studies",
                data=bytes(body),
                headers=headers,
                allow_redirects=False,
                timeout=max(timeout_s, 0.1),
            )
    except requests.RequestException as error:
        message = f"{base} could not be reached ({type(error).__name__})"
        return [Stored(False, message) for _ in objects]
    if response.status_code not in (200, 202):
        message = f"{base} answered {response.status_code} to the STOW-RS store"
        return [Stored(False, message) for _ in objects]
    failed = _failed_uids(response)
    return [Stored(uid not in failed, failed.get(uid, f"stored on {base}")) for uid, _ in objects]


def _failed_uids(response: Any) -> dict[str, str]:
    """SOP Instance UIDs the server's STOW-RS answer lists as failed, with their reason."""
    try:
        answer = response.json()
    except ValueError:
        return {}
    failed = {}
    # DICOM JSON: (0008,1198) Failed SOP Sequence; (0008,1155) Referenced SOP Instance UID;
    # (0008,1197) Failure Reason.
    for item in (answer.get("00081198", {}) or {}).get("Value", []) or []:
        uid = ((item.get("00081155") or {}).get("Value") or [""])[0]
        reason = ((item.get("00081197") or {}).get("Value") or ["?"])[0]
        failed[str(uid)] = f"refused by the server (failure reason {reason})"
    return failed


def study_instances(url: str, study: str, timeout_s: float) -> list[tuple[str, str]]:
    """(series, instance) UIDs of every instance of ``study`` on the DICOMweb server at
    ``url`` (QIDO-RS). For the command line, whose user names the server: no allow-list."""
    import requests

    study = _check_uid(study, "study", 0)
    try:
        with _session() as session:
            response = session.get(
                f"{url.rstrip('/')}/studies/{study}/instances",
                headers={"Accept": "application/dicom+json"},
                allow_redirects=False,
                timeout=timeout_s,
            )
    except requests.RequestException as error:
        raise BadGateway(
            f"{url} could not be reached ({type(error).__name__}).",
            code=ErrorCode.DICOMWEB_UNREACHABLE,
        ) from None
    if response.status_code == 204 or (response.status_code == 200 and not response.content):
        return []
    if response.status_code != 200:
        raise BadGateway(
            f"{url} answered {response.status_code} to the QIDO-RS search of study {study}.",
            code=ErrorCode.DICOMWEB_FAILED,
        )
    try:
        found = [
            (item["0020000E"]["Value"][0], item["00080018"]["Value"][0]) for item in response.json()
        ]
    except (ValueError, KeyError, IndexError, TypeError):
        raise BadGateway(
            f"{url} answered the QIDO-RS search of study {study} with no instance list.",
            code=ErrorCode.DICOMWEB_FAILED,
        ) from None
    return sorted(found)
