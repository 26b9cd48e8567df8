"""Orthanc routes studies through gradcam-service: each series that becomes stable is
read by the service (WADO-RS), explained, and its results stored back (STOW-RS).

An Orthanc Python plugin script (Debian's ``orthanc-python``), configured by the
``GradcamRouter`` section of ``orthanc.json`` beside it. How it behaves:

- Orthanc's change callback only queues the series; worker threads do the work. A
  series is sent in requests of at most ``MaxImagesPerRequest`` images, each image a
  ``dicomweb`` reference to this Orthanc, with ``store`` back to it, for ``Format``
  (a Secondary Capture or Parametric Map per image) and, with ``Report`` "dicom-sr",
  an SR report per image.
- A series that matches a ``VolumeModels`` rule (its modality, and a regular expression
  on its Series Description if the rule has one; the first rule that matches) goes whole,
  as one volume, to the rule's model: one request naming the series without an instance,
  for ``VolumeFormat`` ("dicom-pm": a multi-frame Parametric Map per class; "dicom-seg")
  and the report. A kind of object already in the study for any of its instances is not
  asked for again; a volume is never split, so a refusal other than a transient one fails
  the series with the service's reason.
- Its own results are never routed: a series whose Manufacturer is one of
  ``SkipManufacturers`` (the service writes "gradcam-service") is skipped, and so is
  a series of a non-image modality (``SkipModalities``).
- Exactly once: before each request the study's objects from those manufacturers are
  read for the instances they reference (cached per instance), an SR (the report)
  apart from the others (the heatmap's object), and an instance is sent again only for
  the kind it lacks. The stored objects are the state: a retry after a failure, a
  restart of the service, or an answer lost after the store adds nothing.
- Every object asked for is checked in the answer (each heatmap's, and the report's
  ``stored``): an image is done when all of them were stored.
- A refused, cut or timed-out connection and the statuses 408, 429, 502, 503 and 504
  are retried with exponential back-off (``FirstRetryDelaySeconds`` doubling up to
  ``MaxRetryDelaySeconds``, ``Retry-After`` as a floor), at most ``Retries`` times in a
  row; so is a store the service reports as failed.
- A 413 other than ``image_too_large`` is a limit of the whole request (the pixels or
  pictures of its images together, its memory): the batch is split (before the image
  the service names, else in halves) and the parts sent, down to one image; the series
  then goes on in batches of the largest part the service took. An image refused
  alone, and an error that names an image (too large, unreadable, not an image, gone),
  leave that image out, with its code and reason; any other error fails the series at
  once.
- Each routed series gets the metadata ``GradcamRouter``: JSON with its ``state``
  ("done"; "partial": some images left out; or "failed"), the ``reason`` of a failure,
  the images left out and why, and times. A partial series and a failure are also
  logged at WARNING (codes and counts only) and listed by ``GET /gradcam/router``;
  ``POST /gradcam/router/retry`` routes them again.
- Series queued or in progress are kept in an Orthanc global property
  (``StateProperty``), so a restart of Orthanc routes them again.

Only the standard library: Orthanc runs this file in the system's Python.
"""

from __future__ import annotations

import collections
import http.client
import json
import queue
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

SECTION = "GradcamRouter"
METADATA = "GradcamRouter"  # the series metadata this writes (declared in UserMetadata)
# Answers worth waiting for: the service is starting, stopping, overloaded or behind.
_TRANSIENT = frozenset({408, 429, 502, 503, 504})
# Statuses that, with an image index, are about that image alone.
_IMAGE_STATUSES = frozenset({413, 415, 422})
# The one 413 about an image alone (its pixels, a side, its bytes); every other 413 is
# about what the request's images add up to, and a smaller request may pass.
_IMAGE_TOO_LARGE = "image_too_large"
# What the router asks the service to store for each image: the heatmap's object (the
# Format's) and, with Report, an SR report; told apart in Orthanc by the SR modality.
_MAP, _REPORT = "map", "report"
_REFERENCED_SOP_INSTANCE_UID = "0008,1155"
_UNKNOWN_RESOURCE = 17  # Orthanc's error code for a resource that does not exist
_CACHED_INSTANCES = 100_000


class ConfigError(ValueError):
    """A ``GradcamRouter`` setting is wrong; the message names it."""


@dataclass(frozen=True)
class VolumeRule:
    """One ``VolumeModels`` entry: a series of one of ``modalities`` (and, if given,
    whose Series Description matches ``description``, a regular expression searched
    case-insensitively) goes whole, as one volume, to ``model``."""

    model: str
    modalities: tuple[str, ...]
    description: str = ""

    def matches(self, tags: dict[str, Any]) -> bool:
        if str(tags.get("Modality", "")).upper() not in self.modalities:
            return False
        text = str(tags.get("SeriesDescription", ""))
        return not self.description or re.search(self.description, text, re.I) is not None


def _volume_rules(value: Any) -> tuple[VolumeRule, ...]:
    """``VolumeModels``: a list of {"Model", "Modalities", "SeriesDescription"}."""
    where = f"{SECTION}.VolumeModels"
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list of rules, not {value!r}")
    rules = []
    for number, entry in enumerate(value):
        if not isinstance(entry, dict) or set(entry) - {"Model", "Modalities", "SeriesDescription"}:
            raise ConfigError(
                f"{where}[{number}] must be an object of Model, Modalities and, optionally, "
                "SeriesDescription"
            )
        model, modalities = entry.get("Model"), entry.get("Modalities")
        description = entry.get("SeriesDescription", "")
        if not isinstance(model, str) or not model.strip():
            raise ConfigError(f"{where}[{number}].Model must name a model of the service")
        if (
            not isinstance(modalities, list)
            or not modalities
            or not all(isinstance(m, str) for m in modalities)
        ):
            raise ConfigError(f"{where}[{number}].Modalities must be a list of modalities")
        try:
            re.compile(str(description))
        except (re.error, TypeError):
            raise ConfigError(
                f"{where}[{number}].SeriesDescription is no regular expression"
            ) from None
        codes = tuple(m.strip().upper() for m in modalities)
        rules.append(VolumeRule(model.strip(), codes, str(description)))
    return tuple(rules)


@dataclass(frozen=True)
class RouterSettings:
    """The ``GradcamRouter`` section of Orthanc's configuration."""

    service_url: str
    dicomweb_url: str
    model: str = ""
    format: str = "dicom-sc"
    report: str = ""  # "dicom-sr": an SR report with each image's results, or none
    max_images_per_request: int = 8
    workers: int = 2
    retries: int = 8
    first_retry_delay_s: float = 2.0
    max_retry_delay_s: float = 60.0
    request_timeout_s: float = 180.0
    service_token: str = ""
    skip_manufacturers: tuple[str, ...] = ("gradcam-service",)
    skip_modalities: tuple[str, ...] = (
        "SR",
        "KO",
        "PR",
        "SEG",
        "RTSTRUCT",
        "RTPLAN",
        "REG",
        "DOC",
    )
    state_property: int = 4602
    # Series sent whole, as one volume, to a volume model (first rule that matches), and
    # the format of their maps.
    volume_models: tuple[VolumeRule, ...] = ()
    volume_format: str = "dicom-pm"

    @classmethod
    def from_configuration(cls, configuration: dict[str, Any]) -> RouterSettings:
        """From Orthanc's whole configuration; ``ConfigError`` names a wrong setting."""
        section = configuration.get(SECTION)
        if not isinstance(section, dict):
            raise ConfigError(f"the configuration has no '{SECTION}' section")

        def text(key: str, default: str) -> str:
            value = section.get(key, default)
            if not isinstance(value, str):
                raise ConfigError(f"{SECTION}.{key} must be a string, not {value!r}")
            return value.strip()

        def number(key: str, default: float, low: float, high: float) -> float:
            value = section.get(key, default)
            try:
                found = float(value)  # "${VAR}" substitutions may arrive as strings
            except (TypeError, ValueError):
                raise ConfigError(f"{SECTION}.{key} must be a number, not {value!r}") from None
            if not low <= found <= high:
                raise ConfigError(f"{SECTION}.{key} must be from {low:g} to {high:g}")
            return found

        def names(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
            value = section.get(key, list(default))
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{SECTION}.{key} must be a list of strings")
            return tuple(value)

        service_url = text("ServiceUrl", "").rstrip("/")
        if not service_url.startswith(("http://", "https://")):
            raise ConfigError(f"{SECTION}.ServiceUrl must be an http(s) URL, not {service_url!r}")
        dicomweb_url = text("DicomWebUrl", "").rstrip("/")
        if not dicomweb_url:
            # The service reaches this Orthanc where Orthanc itself listens.
            root = str((configuration.get("DicomWeb") or {}).get("Root", "/dicom-web/"))
            port = configuration.get("HttpPort", 8042)
            dicomweb_url = f"http://127.0.0.1:{port}/{root.strip('/')}"
        if not dicomweb_url.startswith(("http://", "https://")):
            raise ConfigError(f"{SECTION}.DicomWebUrl must be an http(s) URL")
        report = text("Report", "")
        if report not in ("", "dicom-sr"):
            raise ConfigError(f"{SECTION}.Report must be 'dicom-sr' or empty, not {report!r}")
        first = number("FirstRetryDelaySeconds", cls.first_retry_delay_s, 0, 3600)
        return cls(
            service_url=service_url,
            dicomweb_url=dicomweb_url,
            model=text("Model", ""),
            format=text("Format", cls.format) or cls.format,
            report=report,
            max_images_per_request=int(
                number("MaxImagesPerRequest", cls.max_images_per_request, 1, 32)
            ),
            workers=int(number("Workers", cls.workers, 1, 16)),
            retries=int(number("Retries", cls.retries, 0, 100)),
            first_retry_delay_s=first,
            max_retry_delay_s=number("MaxRetryDelaySeconds", cls.max_retry_delay_s, first, 3600),
            request_timeout_s=number("RequestTimeoutSeconds", cls.request_timeout_s, 1, 3600),
            service_token=text("ServiceToken", ""),
            skip_manufacturers=names("SkipManufacturers", cls.skip_manufacturers),
            skip_modalities=names("SkipModalities", cls.skip_modalities),
            state_property=int(number("StateProperty", cls.state_property, 1024, 65535)),
            volume_models=_volume_rules(section.get("VolumeModels", [])),
            volume_format=_volume_format(text("VolumeFormat", cls.volume_format)),
        )


def _volume_format(value: str) -> str:
    if value not in ("dicom-pm", "dicom-seg", "none"):
        raise ConfigError(
            f"{SECTION}.VolumeFormat must be 'dicom-pm', 'dicom-seg' or 'none', not {value!r}"
        )
    return value


class Orthanc(Protocol):
    """What the router needs of Orthanc (the plugin module, or a fake in tests)."""

    def get(self, uri: str) -> Any:
        """The parsed JSON at ``uri`` of Orthanc's REST API; ``LookupError`` if none."""

    def put(self, uri: str, body: str) -> None: ...

    def get_property(self, index: int) -> str: ...

    def set_property(self, index: int, value: str) -> None: ...

    def warning(self, message: str) -> None: ...

    def info(self, message: str) -> None: ...


@dataclass(frozen=True)
class Reply:
    """The service's HTTP answer."""

    status: int
    body: bytes
    retry_after: str | None = None


class Unreachable(Exception):
    """No answer from the service (refused, cut, timed out); the text is the error's type."""


Post = Callable[[str, bytes, dict[str, str], float], Reply]


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect is answered as it is, never followed


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> Reply:
    """POST ``body`` to ``url``: no proxies from the environment, no redirects."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with opener.open(request, timeout=timeout_s) as response:
            return Reply(response.status, response.read(), response.headers.get("Retry-After"))
    except urllib.error.HTTPError as error:
        with error:
            return Reply(error.code, error.read(), error.headers.get("Retry-After"))
    except urllib.error.URLError as error:
        raise Unreachable(type(error.reason).__name__) from None
    except (OSError, http.client.HTTPException) as error:
        raise Unreachable(type(error).__name__) from None


@dataclass
class _Attempt:
    """What one request to the service came to."""

    # "ok", "transient", "image" (one image refused), "too_large" (the request over a
    # limit of the whole request), "fatal"
    kind: str
    reason: str = ""
    code: str = ""  # the service's error code, or the kind of transport failure
    image: int | None = None
    retry_after_s: float = 0.0
    answered: bool = False  # a 200: the service took the whole batch
    stored: set[int] = field(default_factory=set)  # batch indices with every object stored
    # batch index -> (code, why) an object asked for cannot be made for that image
    no_object: dict[int, tuple[str, str]] = field(default_factory=dict)


@dataclass
class _Progress:
    """One series being routed."""

    instances: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> reason
    codes: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> its code
    explained: set[str] = field(default_factory=set)
    requests: int = 0
    retries: int = 0
    splits: int = 0
    # After the service refused a batch as too large: the largest batch it took since
    # (0: none yet). The series goes on in batches of that size, not the refused one.
    fits: int | None = None

    def leave_out(self, uid: str, code: str, why: str) -> None:
        self.skipped[uid] = why
        self.codes[uid] = code

    def batch_size(self, most: int) -> int:
        return min(most, self.fits or most)

    def left_out_codes(self) -> dict[str, int]:
        return dict(sorted(collections.Counter(self.codes.values()).items()))


class Router:
    """Queues stable series and routes them through the service on worker threads."""

    def __init__(
        self,
        settings: RouterSettings,
        orthanc: Orthanc,
        post: Post = post,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], bool] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._orthanc = orthanc
        self._post = post
        self._clock = clock
        self._stopping = threading.Event()
        # Waits, returning True if the router is stopping (tests pass their own).
        self._sleep = self._stopping.wait if sleep is None else sleep
        self._rng = random.Random() if rng is None else rng
        self._lock = threading.Lock()
        self._queue: queue.Queue[str] = queue.Queue()
        self._queued: set[str] = set()
        self._active: set[str] = set()
        self._again: set[str] = set()
        self._pending: dict[str, float] = {}  # series id -> when it became stable
        self._failed: dict[str, str] = {}  # series id -> the reason's first line
        self._partial: dict[str, dict[str, int]] = {}  # series id -> {code: images left out}
        self._started = False
        self._threads: list[threading.Thread] = []
        self._references: collections.OrderedDict[str, frozenset[str]] = collections.OrderedDict()
        # The kinds of object each image should have: the heatmap's (unless Format is
        # "none" with a report) and, with Report, the report.
        wanted = {_REPORT} if settings.report else set()
        if settings.format != "none" or not settings.report:
            wanted.add(_MAP)
        self._wanted = frozenset(wanted)
        # A volume's: its map (unless VolumeFormat is "none" with a report) and report.
        volume = {_REPORT} if settings.report else set()
        if settings.volume_format != "none" or not settings.report:
            volume.add(_MAP)
        self._volume_wanted = frozenset(volume)

    # Orthanc's side: callbacks, start and stop.

    def start(self) -> None:
        """Load what a previous run left pending, then start the workers (after Orthanc
        has started: a plugin may not use the database while it loads)."""
        with self._lock:
            try:
                saved = json.loads(self._orthanc.get_property(self.settings.state_property))
            except ValueError:
                saved = {}
            for series_id, stable_at in (saved.get("pending") or {}).items():
                self._pending.setdefault(series_id, float(stable_at))
            self._failed.update(saved.get("failed") or {})
            self._partial.update(saved.get("partial") or {})
            for series_id in self._pending:
                self._enqueue_locked(series_id)
            self._started = True
            self._save_locked()
        for number in range(self.settings.workers):
            thread = threading.Thread(
                target=self._work, name=f"gradcam-router-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        self._orthanc.info(
            f"gradcam router: {self.settings.workers} worker(s) route stable series "
            f"through {self.settings.service_url} ({len(self._pending)} pending)"
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the workers; a series in progress stays pending for the next start."""
        self._stopping.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def on_stable(self, series_id: str) -> None:
        """Orthanc's STABLE_SERIES: queue it (the work happens on a worker)."""
        with self._lock:
            self._pending.setdefault(series_id, self._clock())
            self._enqueue_locked(series_id)
            if self._started:
                self._save_locked()

    def status(self) -> dict[str, Any]:
        """What ``GET /gradcam/router`` answers: series queued and in progress, failed
        ones with their reason, partial ones with their images left out by code, and
        those images by code over all partial series."""
        with self._lock:
            left_out: collections.Counter[str] = collections.Counter()
            for codes in self._partial.values():
                left_out.update(codes)
            return {
                "service": self.settings.service_url,
                "queued": sorted(self._queued),
                "active": sorted(self._active),
                "failed": dict(sorted(self._failed.items())),
                "partial": dict(sorted(self._partial.items())),
                "left_out": dict(sorted(left_out.items())),
            }

    def retry(self, series_ids: list[str] | None) -> list[str]:
        """Route series again: the failed and partial ones when ``series_ids`` is None."""
        with self._lock:
            chosen = [*self._failed, *self._partial] if series_ids is None else series_ids
            for series_id in chosen:
                self._pending[series_id] = self._clock()
                self._enqueue_locked(series_id)
            self._save_locked()
            return chosen

    def _enqueue_locked(self, series_id: str) -> None:
        if series_id in self._active:
            self._again.add(series_id)  # new instances while it is routed: once more after
        elif series_id not in self._queued:
            self._queued.add(series_id)
            self._queue.put(series_id)

    def _save_locked(self) -> None:
        state = {"pending": self._pending, "failed": self._failed, "partial": self._partial}
        self._orthanc.set_property(self.settings.state_property, json.dumps(state))

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                series_id = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            with self._lock:
                self._queued.discard(series_id)
                self._active.add(series_id)
                stable_at = self._pending.get(series_id, self._clock())
            outcome = "interrupted"
            try:
                outcome = self.route(series_id, stable_at)
            except Exception as error:  # a worker must outlive any one series
                outcome = "failed"
                reason = f"the router failed ({type(error).__name__})"
                self._fail(series_id, stable_at, None, reason, "router_error")
            finally:
                with self._lock:
                    self._active.discard(series_id)
                    if series_id in self._again:
                        self._again.discard(series_id)
                        self._enqueue_locked(series_id)
                    elif outcome != "interrupted":
                        self._pending.pop(series_id, None)
                    # An interrupted series is routed again at the next start; until
                    # then its last outcome stands.
                    if outcome != "interrupted":
                        if outcome != "failed":
                            self._failed.pop(series_id, None)
                        if outcome != "partial":
                            self._partial.pop(series_id, None)
                    self._save_locked()

    # The routing itself.

    def route(self, series_id: str, stable_at: float) -> str:
        """Route one series: "done", "partial" (some images left out), "failed",
        "skipped" (not for the service), "gone" (deleted meanwhile) or "interrupted"
        (the router is stopping)."""
        try:
            series = self._orthanc.get(f"/series/{series_id}")
        except LookupError:
            return "gone"
        tags = series.get("MainDicomTags") or {}
        if tags.get("Manufacturer", "") in self.settings.skip_manufacturers:
            return "skipped"  # results of the service: never routed again
        if tags.get("Modality", "") in self.settings.skip_modalities:
            self._orthanc.info(f"gradcam router: series {series_id} skipped (its modality)")
            return "skipped"
        study_id = series["ParentStudy"]
        study_uid = self._orthanc.get(f"/studies/{study_id}")["MainDicomTags"]["StudyInstanceUID"]
        series_uid = tags["SeriesInstanceUID"]
        listed = self._orthanc.get(f"/series/{series_id}/instances")
        progress = _Progress(_in_order(listed))
        rule = next((r for r in self.settings.volume_models if r.matches(tags)), None)
        if rule is not None:
            where = (study_id, study_uid, series_uid)
            return self._route_volume(series_id, stable_at, rule, where, progress)
        # Parts of a batch the service refused as too large, sent before anything else.
        parts: list[list[str]] = []
        failures = 0
        while True:
            have = self._referenced(study_id)
            missing: dict[str, frozenset[str]] = {}  # in Instance Number order
            for uid in progress.instances:
                lacks = self._wanted - have.get(uid, frozenset())
                if lacks and uid not in progress.skipped and uid not in progress.explained:
                    missing[uid] = lacks
            if not missing:
                return self._finish(series_id, stable_at, progress, have)
            batch, from_part = self._next_batch(missing, parts, progress)
            attempt = self._explain(study_uid, series_uid, batch, missing[batch[0]])
            progress.requests += 1
            if attempt.answered and progress.fits is not None:
                progress.fits = max(progress.fits, len(batch))
            for index in attempt.stored:
                progress.explained.add(batch[index])
            for index, (code, why) in attempt.no_object.items():
                progress.leave_out(batch[index], code, why)
            if attempt.kind == "ok":
                failures = 0
                continue
            if attempt.kind == "too_large":
                if len(batch) == 1:
                    progress.leave_out(batch[0], attempt.code, attempt.reason)
                    continue
                # Before the image the service names, the images fit (its limits add
                # up image by image); without one, in halves. Each part is smaller than
                # its batch, so a batch of n costs at most 2n - 1 requests.
                cut = attempt.image
                if cut is None or not 0 < cut < len(batch):
                    cut = (len(batch) + 1) // 2
                parts[:0] = [batch[:cut], batch[cut:]]
                progress.splits += 1
                progress.fits = 0
                continue
            if attempt.kind == "image" and attempt.image is not None:
                progress.leave_out(batch[attempt.image], attempt.code, attempt.reason)
                rest = batch[: attempt.image] + batch[attempt.image + 1 :]
                if from_part and rest:
                    parts.insert(0, rest)  # still within the size the service took
                continue
            if attempt.kind == "transient":
                failures += 1
                if failures <= self.settings.retries:
                    progress.retries += 1
                    if from_part:
                        parts.insert(0, batch)  # what is still missing of it, again
                    if self._sleep(self._delay(failures, attempt.retry_after_s)):
                        return "interrupted"
                    continue
                attempt.reason += f" ({failures} attempts)"
            self._fail(series_id, stable_at, progress, attempt.reason, attempt.code)
            return "failed"

    def _route_volume(
        self,
        series_id: str,
        stable_at: float,
        rule: VolumeRule,
        where: tuple[str, str, str],
        progress: _Progress,
    ) -> str:
        """A series sent whole, as one volume, to ``rule.model``: one request (retried
        while transient); a kind of object already in the study for any of its
        instances is not asked for again (a Segmentation has frames only where its
        segments are, so it references only some of them)."""
        study_id, study_uid, series_uid = where
        wanted = self._volume_wanted
        failures = 0
        while True:
            have = self._referenced(study_id)
            found = frozenset().union(*(have.get(uid, frozenset()) for uid in progress.instances))
            lacks = wanted - found
            if not lacks:
                return self._finish(series_id, stable_at, progress, have, wanted)
            attempt = self._explain(study_uid, series_uid, [], lacks, rule)
            progress.requests += 1
            if attempt.kind == "ok" and 0 in attempt.no_object:
                code, why = attempt.no_object[0]
                for uid in progress.instances:
                    progress.leave_out(uid, code, why)
                return self._finish(series_id, stable_at, progress, have, wanted)
            if attempt.kind == "ok":
                progress.explained.update(progress.instances)
                return self._finish(
                    series_id, stable_at, progress, self._referenced(study_id), wanted
                )
            if attempt.kind == "transient":
                failures += 1
                if failures <= self.settings.retries:
                    progress.retries += 1
                    if self._sleep(self._delay(failures, attempt.retry_after_s)):
                        return "interrupted"
                    continue
                attempt.reason += f" ({failures} attempts)"
            # A volume is not split: any other refusal (a missing slice, too large, ...)
            # fails the series with the service's reason.
            self._fail(series_id, stable_at, progress, attempt.reason, attempt.code)
            return "failed"

    def _next_batch(
        self, missing: dict[str, frozenset[str]], parts: list[list[str]], progress: _Progress
    ) -> tuple[list[str], bool]:
        """The next request's images, all lacking the same kinds of object, and whether
        they are a part of a split batch."""
        while parts:
            part = [uid for uid in parts.pop(0) if uid in missing]
            if part:
                # Images whose kinds differ (one of them stored meanwhile) come later.
                return [uid for uid in part if missing[uid] == missing[part[0]]], True
        first = missing[next(iter(missing))]
        alike = [uid for uid, lacks in missing.items() if lacks == first]
        return alike[: progress.batch_size(self.settings.max_images_per_request)], False

    def _delay(self, failures: int, retry_after_s: float) -> float:
        """Seconds before attempt ``failures`` + 1: doubling, half of it random."""
        settings = self.settings
        ceiling = settings.first_retry_delay_s * 2 ** (failures - 1)
        ceiling = min(ceiling, settings.max_retry_delay_s)
        delay = ceiling / 2 + self._rng.uniform(0, ceiling / 2)
        return float(max(delay, min(retry_after_s, settings.max_retry_delay_s)))

    def _explain(
        self,
        study: str,
        series: str,
        batch: list[str],
        kinds: frozenset[str],
        volume: VolumeRule | None = None,
    ) -> _Attempt:
        """Ask the service for ``kinds`` of object for each image of ``batch``, or, with
        ``volume``, for the whole series as one volume."""
        settings = self.settings
        where = {"url": settings.dicomweb_url, "study": study, "series": series}
        images = [{"dicomweb": {**where, "instance": uid}} for uid in batch]
        fmt = settings.format
        if volume is not None:
            images, fmt = [{"dicomweb": where}], settings.volume_format
        body: dict[str, Any] = {
            "images": images,
            "heatmap": {"format": fmt if _MAP in kinds else "none"},
            "store": {"url": settings.dicomweb_url},
            "top_k": 1,
        }
        model = volume.model if volume is not None else settings.model
        if model:
            body["model"] = model
        if _REPORT in kinds:
            body["report"] = settings.report
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if settings.service_token:
            headers["Authorization"] = f"Bearer {settings.service_token}"
        try:
            reply = self._post(
                f"{settings.service_url}/v1/explain",
                json.dumps(body).encode(),
                headers,
                settings.request_timeout_s,
            )
        except Unreachable as unreachable:
            kind = str(unreachable)
            return _Attempt("transient", f"the service could not be reached ({kind})", kind)
        try:
            answer = json.loads(reply.body)
        except ValueError:
            answer = None
        if reply.status == 200 and isinstance(answer, dict):
            return _answered(answer, len(images), kinds)
        found = answer.get("error") if isinstance(answer, dict) else None
        error: dict[str, Any] = found if isinstance(found, dict) else {}
        code = str(error.get("code") or reply.status)[:60]
        reason = f"the service answered {reply.status} {code}: {error.get('message', '')}"
        if reply.status in _TRANSIENT:
            return _Attempt("transient", reason, code, retry_after_s=_seconds(reply.retry_after))
        image = error.get("image")
        named = image if isinstance(image, int) and 0 <= image < len(batch) else None
        where = str(error.get("field") or "")
        about_one = f"{code}: {error.get('message', '')}"
        if reply.status == 413 and (code != _IMAGE_TOO_LARGE or named is None):
            return _Attempt("too_large", about_one, code, image=named)
        if reply.status in _IMAGE_STATUSES and named is not None and not where.endswith(".url"):
            return _Attempt("image", about_one, code, image=named)
        return _Attempt("fatal", reason, code)

    def _referenced(self, study_id: str) -> dict[str, frozenset[str]]:
        """SOP Instance UIDs that the study's objects from the service reference, each
        with the kinds of object that reference it (an SR is a report, the rest maps)."""
        found: dict[str, set[str]] = collections.defaultdict(set)
        for series in self._orthanc.get(f"/studies/{study_id}/series"):
            tags = series.get("MainDicomTags") or {}
            if tags.get("Manufacturer", "") not in self.settings.skip_manufacturers:
                continue
            kind = _REPORT if tags.get("Modality", "") == "SR" else _MAP
            for instance_id in series.get("Instances") or []:
                for uid in self._references_of(instance_id):
                    found[uid].add(kind)
        return {uid: frozenset(kinds) for uid, kinds in found.items()}

    def _references_of(self, instance_id: str) -> frozenset[str]:
        with self._lock:
            cached = self._references.get(instance_id)
        if cached is not None:
            return cached
        try:
            tags = self._orthanc.get(f"/instances/{instance_id}/tags?short")
        except LookupError:
            return frozenset()
        found = frozenset(_values_of(tags, _REFERENCED_SOP_INSTANCE_UID))
        with self._lock:
            self._references[instance_id] = found
            while len(self._references) > _CACHED_INSTANCES:
                self._references.popitem(last=False)
        return found

    def _finish(
        self,
        series_id: str,
        stable_at: float,
        progress: _Progress,
        have: dict[str, frozenset[str]],
        wanted: frozenset[str] | None = None,
    ) -> str:
        """Every image has its objects or was left out: "done", or "partial" if any was
        (``wanted``: the kinds each should have, a volume's own)."""
        now = self._clock()
        outcome = "partial" if progress.skipped else "done"
        codes = progress.left_out_codes()
        kinds = self._wanted if wanted is None else wanted
        with_results = sum(kinds <= have.get(uid, frozenset()) for uid in progress.instances)
        self._write(
            series_id,
            {
                "state": outcome,
                "stable_at": stable_at,
                "finished_at": now,
                "seconds": round(now - stable_at, 3),
                "instances": len(progress.instances),
                "with_results": with_results,
                "explained_now": len(progress.explained),
                "requests": progress.requests,
                "retries": progress.retries,
                "splits": progress.splits,
                "left_out": progress.skipped,
                "left_out_codes": codes,
            },
        )
        if outcome == "partial":
            with self._lock:
                self._partial[series_id] = codes
            # Codes and counts only: the reasons may quote the image's header.
            counted = ", ".join(f"{code}: {count}" for code, count in codes.items())
            self._orthanc.warning(
                f"gradcam router: series {series_id} partial, {len(progress.skipped)} of "
                f"{len(progress.instances)} image(s) left out ({counted}); "
                f"GET /series/{series_id}/metadata/{METADATA} says which, "
                "POST /gradcam/router/retry routes it again"
            )
        return outcome

    def _fail(
        self,
        series_id: str,
        stable_at: float,
        progress: _Progress | None,
        reason: str,
        code: str = "",
    ) -> None:
        state: dict[str, Any] = {
            "state": "failed",
            "reason": reason,
            "stable_at": stable_at,
            "failed_at": self._clock(),
        }
        if progress is not None:
            state |= {
                "instances": len(progress.instances),
                "explained_now": len(progress.explained),
                "requests": progress.requests,
                "retries": progress.retries,
                "splits": progress.splits,
                "left_out": progress.skipped,
                "left_out_codes": progress.left_out_codes(),
            }
        try:
            self._write(series_id, state)
        except Exception as error:  # the warning below still says it
            self._orthanc.warning(
                f"gradcam router: no state written for {series_id} ({type(error).__name__})"
            )
        with self._lock:
            self._failed[series_id] = reason.splitlines()[0][:300]
        # The reason may quote the image's header (the service's message): it stays in
        # Orthanc's metadata, and the log names only the code.
        self._orthanc.warning(
            f"gradcam router: series {series_id} failed ({code or 'error'}); "
            f"GET /series/{series_id}/metadata/{METADATA} says why, "
            "POST /gradcam/router/retry routes it again"
        )

    def _write(self, series_id: str, state: dict[str, Any]) -> None:
        self._orthanc.put(f"/series/{series_id}/metadata/{METADATA}", json.dumps(state))


def _answered(answer: dict[str, Any], count: int, kinds: frozenset[str]) -> _Attempt:
    """A 200 answer: which images have every object of ``kinds`` stored, which cannot
    have one (and why); an object not stored makes the attempt transient (what was
    stored is not asked for again)."""
    attempt = _Attempt("ok", answered=True)
    results = answer.get("results") or []
    unstored = ""
    for index in range(count):
        result = results[index] if index < len(results) else {}
        holders = {
            # dicom-seg: the heatmaps carry neither, the segmentation is the object.
            _MAP: [
                *((e.get("heatmap") or {}) for e in result.get("explanations") or []),
                *([result["segmentation"]] if isinstance(result.get("segmentation"), dict) else []),
            ],
            _REPORT: [result["report"]] if isinstance(result.get("report"), dict) else [],
        }
        failed, reasons = "", {}
        for kind in sorted(kinds):
            made = [h for h in holders[kind] if "stored" in h or "reason" in h]
            why = [str(h["reason"]) for h in made if h.get("reason")]
            outcomes = [h["stored"] for h in made if isinstance(h.get("stored"), dict)]
            if why:
                reasons[kind] = "; ".join(why)
            elif not outcomes:
                failed = failed or f"no {kind} object in the answer"
            for outcome in outcomes:
                if not outcome.get("ok"):
                    failed = failed or str(outcome.get("message", "")) or "refused"
        if failed:
            unstored = unstored or failed
        elif _MAP in reasons:
            attempt.no_object[index] = ("no_object", reasons[_MAP])
        elif _REPORT in reasons:
            attempt.no_object[index] = ("no_report", f"report: {reasons[_REPORT]}")
        else:
            attempt.stored.add(index)
    if unstored:
        attempt.kind = "transient"
        attempt.code = "store_failed"
        attempt.reason = f"the service's store to Orthanc failed: {unstored}"
    return attempt


def _seconds(retry_after: str | None) -> float:
    try:
        return max(0.0, float(retry_after or 0))
    except ValueError:
        return 0.0  # an HTTP date: the back-off alone decides


def _in_order(instances: list[dict[str, Any]]) -> list[str]:
    """SOP Instance UIDs in Instance Number order."""

    def key(instance: dict[str, Any]) -> tuple[int, str]:
        tags = instance.get("MainDicomTags") or {}
        try:
            number = int(str(tags.get("InstanceNumber", "")).strip() or 0)
        except ValueError:
            number = 0
        return number, str(tags.get("SOPInstanceUID", ""))

    return [instance["MainDicomTags"]["SOPInstanceUID"] for instance in sorted(instances, key=key)]


def _values_of(tags: Any, tag: str) -> list[str]:
    """Every value of ``tag`` anywhere in Orthanc's ``tags?short`` JSON."""
    found: list[str] = []
    stack = [tags]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == tag and isinstance(value, str):
                    found.append(value.strip().rstrip("\0"))
                else:
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)
    return found


class _Plugin:
    """``Orthanc`` over the plugin module."""

    def __init__(self, module: Any) -> None:
        self._module = module

    def get(self, uri: str) -> Any:
        try:
            return json.loads(self._module.RestApiGet(uri))
        except self._module.OrthancException as error:
            if error.args and error.args[0] == _UNKNOWN_RESOURCE:
                raise LookupError(uri) from None
            raise

    def put(self, uri: str, body: str) -> None:
        self._module.RestApiPut(uri, body)

    def get_property(self, index: int) -> str:
        return str(self._module.GetGlobalProperty(index, "{}"))

    def set_property(self, index: int, value: str) -> None:
        self._module.SetGlobalProperty(index, value)

    def warning(self, message: str) -> None:
        self._module.LogWarning(message)

    def info(self, message: str) -> None:
        self._module.LogInfo(message)


def install(module: Any) -> Router:
    """Read the settings (a wrong one stops Orthanc, named) and hook the router in."""
    settings = RouterSettings.from_configuration(json.loads(module.GetConfiguration()))
    router = Router(settings, _Plugin(module))

    def on_change(change_type: int, level: int, resource_id: str) -> None:
        if change_type == module.ChangeType.STABLE_SERIES:
            router.on_stable(resource_id)
        elif change_type == module.ChangeType.ORTHANC_STARTED:
            router.start()
        elif change_type == module.ChangeType.ORTHANC_STOPPED:
            router.stop()

    def status(output: Any, uri: str, **request: Any) -> None:
        if request.get("method") != "GET":
            output.SendMethodNotAllowed("GET")
            return
        output.AnswerBuffer(json.dumps(router.status(), indent=2), "application/json")

    def retry(output: Any, uri: str, **request: Any) -> None:
        if request.get("method") != "POST":
            output.SendMethodNotAllowed("POST")
            return
        try:
            chosen = json.loads(request.get("body") or b"null")
        except ValueError:
            chosen = "invalid"
        if chosen is not None and not (
            isinstance(chosen, list) and all(isinstance(item, str) for item in chosen)
        ):
            output.SendHttpStatus(400, b"a JSON list of Orthanc series IDs, or nothing")
            return
        output.AnswerBuffer(json.dumps({"queued": router.retry(chosen)}), "application/json")

    module.RegisterOnChangeCallback(on_change)
    module.RegisterRestCallback("/gradcam/router", status)
    module.RegisterRestCallback("/gradcam/router/retry", retry)
    module.LogWarning(
        f"gradcam router: stable series go to {settings.service_url} as {settings.format}"
        f"{' with ' + settings.report if settings.report else ''}, "
        f"read from and stored to {settings.dicomweb_url}"
    )
    return router


try:
    import orthanc  # the Python plugin's module: there only inside Orthanc
except ImportError:
    pass
else:
    install(orthanc)
