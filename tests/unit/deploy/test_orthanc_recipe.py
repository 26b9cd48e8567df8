"""deploy/orthanc/: the Orthanc configuration parses once its ``${VAR}`` are put in as
Orthanc does, and the router plugin (``gradcam_router.py``) routes, skips, retries
and fails as its docstring says, driven here in-process with a fake Orthanc and a
fake service (no Orthanc, no server, no sleeping). The real thing is in
``test_orthanc_routing.py``."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import py_compile
import random
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.helpers import REPO, wait_until

RECIPE = REPO / "deploy" / "orthanc"
DICOMWEB = "http://127.0.0.1:8042/dicom-web"
SERVICE = "http://127.0.0.1:8000"
# Orthanc's substitution: ${NAME} or ${NAME:-default}; an unset name without a default
# becomes empty.
_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def substituted(text: str, environ: dict[str, str]) -> str:
    return _VARIABLE.sub(lambda m: environ.get(m.group(1), m.group(2) or ""), text)


def load_router() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gradcam_router", RECIPE / "gradcam_router.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gradcam_router"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


router_module = load_router()


def test_the_configuration_parses_with_defaults_and_with_the_environment() -> None:
    text = (RECIPE / "orthanc.json").read_text()
    defaults = json.loads(substituted(text, {}))
    assert defaults["HttpPort"] == 8042 and defaults["DicomPort"] == 4242
    assert defaults["DicomAet"] == "ORTHANC" and defaults["RemoteAccessAllowed"] is False
    assert defaults["UserMetadata"][router_module.METADATA] >= 1024
    settings = router_module.RouterSettings.from_configuration(defaults)
    assert settings.service_url == SERVICE
    assert settings.dicomweb_url == DICOMWEB  # Orthanc's own port and DICOMweb root
    assert settings.format == "dicom-sc" and settings.skip_manufacturers == ("gradcam-service",)
    assert settings.report == ""  # no report unless asked
    environ = {
        "ORTHANC_HTTP_PORT": "9042",
        "ORTHANC_DICOM_PORT": "5242",
        "ORTHANC_AET": "PACS",
        "GRADCAM_SERVICE_URL": "http://gradcam:8000/",
        "GRADCAM_ROUTER_DICOMWEB_URL": "http://orthanc:9042/dicom-web",
        "GRADCAM_ROUTER_FORMAT": "dicom-pm",
        "GRADCAM_ROUTER_REPORT": "dicom-sr",
        "GRADCAM_ROUTER_MAX_IMAGES": "4",
        "GRADCAM_ROUTER_RETRIES": "3",
    }
    configured = json.loads(substituted(text, environ))
    assert (configured["HttpPort"], configured["DicomPort"]) == (9042, 5242)
    settings = router_module.RouterSettings.from_configuration(configured)
    assert settings.service_url == "http://gradcam:8000"
    assert settings.dicomweb_url == "http://orthanc:9042/dicom-web"
    assert (settings.format, settings.max_images_per_request, settings.retries) == (
        "dicom-pm",
        4,
        3,
    )
    assert settings.report == "dicom-sr"


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("ServiceUrl", "", "GradcamRouter.ServiceUrl"),
        ("MaxImagesPerRequest", 33, "GradcamRouter.MaxImagesPerRequest"),
        ("Retries", "many", "GradcamRouter.Retries"),
        ("SkipManufacturers", "gradcam-service", "GradcamRouter.SkipManufacturers"),
        ("StateProperty", 12, "GradcamRouter.StateProperty"),
        ("Report", "dicom-seg", "GradcamRouter.Report"),
    ],
)
def test_a_wrong_setting_is_named(key: str, value: object, named: str) -> None:
    configuration = json.loads(substituted((RECIPE / "orthanc.json").read_text(), {}))
    configuration["GradcamRouter"][key] = value
    with pytest.raises(router_module.ConfigError, match=re.escape(named)):
        router_module.RouterSettings.from_configuration(configuration)


def test_the_plugin_compiles_and_imports_without_orthanc(tmp_path: Path) -> None:
    py_compile.compile(
        str(RECIPE / "gradcam_router.py"), cfile=str(tmp_path / "router.pyc"), doraise=True
    )
    assert not hasattr(router_module, "orthanc")  # nothing installed outside Orthanc


# A fake Orthanc: a study of source series and what the fake service stores into it.


class FakeOrthanc:
    def __init__(self) -> None:
        self.series: dict[str, dict[str, Any]] = {}
        self.instances: dict[str, dict[str, Any]] = {}  # id -> {"uid", "refs"}
        self.metadata: dict[str, str] = {}
        self.properties: dict[int, str] = {}
        self.warnings: list[str] = []
        self.infos: list[str] = []

    def add_series(
        self, series_id: str, count: int, manufacturer: str = "", modality: str = "CR"
    ) -> list[str]:
        uids = [f"1.2.3.{len(self.instances) + n + 1}" for n in range(count)]
        ids = []
        for number, uid in enumerate(uids, 1):
            instance_id = f"{series_id}-i{number}"
            self.instances[instance_id] = {"uid": uid, "number": number, "refs": []}
            ids.append(instance_id)
        self.series[series_id] = {
            "ID": series_id,
            "ParentStudy": "study",
            "Instances": ids,
            "MainDicomTags": {
                "SeriesInstanceUID": f"2.25.{len(self.series) + 1}",
                "Manufacturer": manufacturer,
                "Modality": modality,
            },
        }
        return uids

    def add_result(self, source_uid: str, modality: str = "OT") -> None:
        """What the service stores for one source image: a series referencing it (a
        Secondary Capture, or with "SR" a report)."""
        series_id = f"derived-{len(self.series)}"
        self.add_series(series_id, 1, manufacturer="gradcam-service", modality=modality)
        self.instances[f"{series_id}-i1"]["refs"] = [source_uid]

    def results_of(self, source_uid: str) -> list[str]:
        """The modality of each object from the service that references ``source_uid``."""
        return sorted(
            series["MainDicomTags"]["Modality"]
            for series in self.series.values()
            if series["MainDicomTags"]["Manufacturer"] == "gradcam-service"
            and source_uid in self.instances[series["Instances"][0]]["refs"]
        )

    def get(self, uri: str) -> Any:
        path, _, _ = uri.partition("?")
        parts = path.strip("/").split("/")
        if parts == ["studies", "study"]:
            return {"MainDicomTags": {"StudyInstanceUID": "1.2.840.1"}}
        if parts == ["studies", "study", "series"]:
            return list(self.series.values())
        if parts[0] == "series" and parts[1] in self.series:
            series = self.series[parts[1]]
            if len(parts) == 2:
                return series
            return [
                {
                    "MainDicomTags": {
                        "SOPInstanceUID": self.instances[i]["uid"],
                        "InstanceNumber": str(self.instances[i]["number"]),
                    }
                }
                for i in reversed(series["Instances"])  # Orthanc's order is not the series'
            ]
        if parts[0] == "instances" and parts[2] == "tags":
            sources = [
                {"0008,1150": "1.2.840.10008.5.1.4.1.1.1", "0008,1155": uid}
                for uid in self.instances[parts[1]]["refs"]
            ]
            return {"0008,0018": "9.9", "0008,2112": sources}
        raise LookupError(uri)

    def put(self, uri: str, body: str) -> None:
        self.metadata[uri] = body

    def get_property(self, index: int) -> str:
        return self.properties.get(index, "{}")

    def set_property(self, index: int, value: str) -> None:
        self.properties[index] = value

    def saved(self) -> dict[str, Any]:
        """What the router keeps across a restart of Orthanc."""
        found: dict[str, Any] = json.loads(self.properties.get(4602, "{}"))
        return found

    def warning(self, message: str) -> None:
        self.warnings.append(message)

    def info(self, message: str) -> None:
        self.infos.append(message)

    def state(self, series_id: str) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(
            self.metadata[f"/series/{series_id}/metadata/{router_module.METADATA}"]
        )
        return found


class FakeService:
    """Answers /v1/explain as scripted (a list of replies or exceptions, then 200s
    that store what was asked for each image into the fake Orthanc: its heatmap's
    object unless the format is "none", and its report if one was asked for).
    ``refuse(uids)``, when given, answers a reply instead (a 413 for a request the
    service finds too large)."""

    def __init__(
        self,
        orthanc: FakeOrthanc,
        script: list[Any] | None = None,
        refuse: Any = None,
    ) -> None:
        self.orthanc = orthanc
        self.script = list(script or [])
        self.refuse = refuse
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> Any:
        assert url == f"{SERVICE}/v1/explain"
        assert headers["Content-Type"] == "application/json"
        request = json.loads(body)
        self.bodies.append(request)
        assert len(self.bodies) <= 100, "the router does not stop asking"
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, Exception):
                raise step
            return step
        if "instance" not in request["images"][0]["dicomweb"]:
            return self._volume(request)
        uids = [image["dicomweb"]["instance"] for image in request["images"]]
        refused = self.refuse(uids) if self.refuse is not None else None
        if refused is not None:
            return refused
        heatmap = request["heatmap"]["format"] != "none"
        report = "report" in request
        for uid in uids:
            if heatmap:
                self.orthanc.add_result(uid)
            if report:
                self.orthanc.add_result(uid, modality="SR")
        results = [stored(True if heatmap else None, True if report else None) for _ in uids]
        return reply(200, {"results": results})

    def _volume(self, request: dict[str, Any]) -> Any:
        """A whole series explained as one volume: its Parametric Map (and report)
        reference every one of its instances."""
        (image,) = request["images"]
        (series,) = [
            s
            for s in self.orthanc.series.values()
            if s["MainDicomTags"]["SeriesInstanceUID"] == image["dicomweb"]["series"]
        ]
        uids = [self.orthanc.instances[i]["uid"] for i in series["Instances"]]
        heatmap = request["heatmap"]["format"] != "none"
        report = "report" in request
        for wanted, modality in ((heatmap, "OT"), (report, "SR")):
            if wanted:
                self.orthanc.add_result(uids[0], modality)
                derived = list(self.orthanc.series.values())[-1]
                self.orthanc.instances[derived["Instances"][0]]["refs"] = uids
        return reply(
            200, {"results": [stored(True if heatmap else None, True if report else None)]}
        )

    def sent(self) -> list[str]:
        return [i["dicomweb"]["instance"] for body in self.bodies for i in body["images"]]

    def sizes(self) -> list[int]:
        return [len(body["images"]) for body in self.bodies]


def reply(status: int, body: dict[str, Any], retry_after: str | None = None) -> Any:
    return router_module.Reply(status, json.dumps(body).encode(), retry_after)


def stored(ok: bool | None = True, report: bool | None = None) -> dict[str, Any]:
    """One image's result: its Secondary Capture stored or not (None: format "none",
    nothing asked), and with ``report`` its report stored or not."""
    heatmap: dict[str, Any] = {"format": "dicom-sc" if ok is not None else "none"}
    if ok is not None:
        heatmap["stored"] = {"ok": ok, "message": "m"}
    result: dict[str, Any] = {"explanations": [{"heatmap": heatmap}]}
    if report is not None:
        result["report"] = {"stored": {"ok": report, "message": "m"}}
    return result


def error(status: int, code: str, image: int | None = None, field: str = "") -> Any:
    body = {"error": {"code": code, "message": f"Image {image}: no.", "image": image}}
    if field:
        body["error"]["field"] = field
    return reply(status, body)


def settings(**changes: Any) -> Any:
    base = router_module.RouterSettings(
        service_url=SERVICE,
        dicomweb_url=DICOMWEB,
        max_images_per_request=2,
        retries=3,
        first_retry_delay_s=1.0,
        max_retry_delay_s=3.0,
    )
    return dataclasses.replace(base, **changes)


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> bool:
        self.append(seconds)
        return False  # not stopping


def make(
    script: list[Any] | None = None, refuse: Any = None, **changes: Any
) -> tuple[Any, FakeOrthanc, FakeService, Sleeps]:
    orthanc = FakeOrthanc()
    service = FakeService(orthanc, script, refuse)
    sleeps = Sleeps()
    router = router_module.Router(
        settings(**changes),
        orthanc,
        post=service,
        clock=lambda: 100.0,
        sleep=sleeps,
        rng=random.Random(0),
    )
    return router, orthanc, service, sleeps


def test_a_series_goes_in_batches_by_uids_and_is_marked_done() -> None:
    router, orthanc, service, sleeps = make()
    uids = orthanc.add_series("s1", 5)
    assert router.route("s1", 90.0) == "done"
    assert [len(body["images"]) for body in service.bodies] == [2, 2, 1]
    assert service.sent() == uids  # in Instance Number order
    body = service.bodies[0]
    assert body["images"][0]["dicomweb"] == {
        "url": DICOMWEB,
        "study": "1.2.840.1",
        "series": orthanc.series["s1"]["MainDicomTags"]["SeriesInstanceUID"],
        "instance": uids[0],
    }
    assert body["store"] == {"url": DICOMWEB} and body["heatmap"] == {"format": "dicom-sc"}
    assert "report" not in body
    state = orthanc.state("s1")
    assert state["state"] == "done" and state["with_results"] == 5 and state["seconds"] == 10.0
    assert sleeps == [] and orthanc.warnings == []


def test_a_report_is_asked_for_when_configured() -> None:
    router, orthanc, service, _ = make(report="dicom-sr")
    orthanc.add_series("s1", 1)
    assert router.route("s1", 0.0) == "done"
    (body,) = service.bodies
    assert body["report"] == "dicom-sr" and body["heatmap"] == {"format": "dicom-sc"}


def test_its_own_results_and_non_images_are_never_routed() -> None:
    router, orthanc, service, _ = make()
    orthanc.add_series("ours", 2, manufacturer="gradcam-service")
    orthanc.add_series("report", 1, modality="SR")
    assert router.route("ours", 0.0) == "skipped"
    assert router.route("report", 0.0) == "skipped"
    assert router.route("deleted", 0.0) == "gone"
    assert service.bodies == [] and orthanc.metadata == {}


def test_an_instance_that_has_results_is_not_sent_again() -> None:
    """The crash between store and answer: results there, no state written."""
    router, orthanc, service, _ = make()
    uids = orthanc.add_series("s1", 3)
    orthanc.add_result(uids[1])
    assert router.route("s1", 0.0) == "done"
    assert service.sent() == [uids[0], uids[2]]
    # Routed again (the series became stable again): nothing to send.
    assert router.route("s1", 0.0) == "done"
    assert len(service.bodies) == 1
    assert orthanc.state("s1")["with_results"] == 3


def test_503_and_a_refused_connection_are_retried_with_back_off() -> None:
    unreachable = router_module.Unreachable("ConnectionRefusedError")
    router, orthanc, service, sleeps = make(
        [error(503, "engine_unavailable"), unreachable, reply(503, {}, retry_after="2.5")]
    )
    orthanc.add_series("s1", 1)
    assert router.route("s1", 0.0) == "done"
    assert len(service.bodies) == 4
    # Doubling from 1 s, half of each at random; Retry-After is a floor.
    assert 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0 and sleeps[2] >= 2.5
    assert orthanc.state("s1")["retries"] == 3


def test_after_the_last_retry_the_failure_is_where_an_operator_looks() -> None:
    down = router_module.Unreachable("ConnectionRefusedError")
    router, orthanc, service, sleeps = make([down] * 10)
    orthanc.add_series("s1", 1)
    assert router.route("s1", 0.0) == "failed"
    assert len(service.bodies) == 4 and len(sleeps) == 3
    assert max(sleeps) <= 3.0  # capped
    state = orthanc.state("s1")
    assert state["state"] == "failed" and "could not be reached" in state["reason"]
    assert "4 attempts" in state["reason"]
    assert router.status()["failed"] == {"s1": state["reason"]}
    (warning,) = orthanc.warnings
    assert "s1" in warning and "metadata/GradcamRouter" in warning
    # retry() routes it again; now the service answers.
    assert router.retry(None) == ["s1"]
    assert router.status()["queued"] == ["s1"]


def test_the_service_message_is_kept_in_orthanc_not_logged() -> None:
    secret = reply(
        403,
        {"error": {"code": "dicomweb_not_allowed", "message": "PHANTOM^NODULE", "image": 0}},
    )
    router, orthanc, service, sleeps = make([secret])
    orthanc.add_series("s1", 1)
    assert router.route("s1", 0.0) == "failed"  # a wrong setting: at once, no retry
    assert sleeps == [] and len(service.bodies) == 1
    assert "PHANTOM^NODULE" in orthanc.state("s1")["reason"]
    assert "dicomweb_not_allowed" in orthanc.warnings[0]
    assert "PHANTOM" not in orthanc.warnings[0]


@pytest.mark.parametrize(("status", "code"), [(422, "invalid_image"), (413, "image_too_large")])
def test_an_image_the_service_refuses_is_left_out_with_its_reason(status: int, code: str) -> None:
    """An error about one image (image_too_large is the one 413 that is) leaves it out
    at once: the batch is not split for it."""
    router, orthanc, service, sleeps = make([error(status, code, image=1)])
    uids = orthanc.add_series("s1", 3)
    assert router.route("s1", 0.0) == "partial"
    assert service.sent() == [uids[0], uids[1], uids[0], uids[2]]
    state = orthanc.state("s1")
    assert state["state"] == "partial" and state["splits"] == 0
    assert list(state["left_out"]) == [uids[1]] and code in state["left_out"][uids[1]]
    assert state["left_out_codes"] == {code: 1}
    assert state["with_results"] == 2 and sleeps == []


def test_a_store_that_failed_is_retried_for_the_images_not_stored() -> None:
    router, orthanc, service, sleeps = make()
    uids = orthanc.add_series("s1", 2)

    def half_stored(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> Any:
        images = json.loads(body)["images"]
        service.bodies.append(json.loads(body))
        if len(service.bodies) == 1:
            orthanc.add_result(images[0]["dicomweb"]["instance"])
            return reply(200, {"results": [stored(), stored(ok=False)]})
        return service(url, body, headers, timeout_s)

    router._post = half_stored
    assert router.route("s1", 0.0) == "done"
    assert service.sent()[-1] == uids[1] and len(sleeps) == 1
    assert orthanc.state("s1")["with_results"] == 2


def test_an_image_with_no_object_is_left_out_not_retried() -> None:
    no_object = {"explanations": [{"heatmap": {"format": "dicom-pm", "reason": "no plane"}}]}
    router, orthanc, service, sleeps = make(
        [reply(200, {"results": [no_object]})], format="dicom-pm"
    )
    (uid,) = orthanc.add_series("s1", 1)
    assert router.route("s1", 0.0) == "partial"
    assert orthanc.state("s1")["left_out"] == {uid: "no plane"}
    assert orthanc.state("s1")["left_out_codes"] == {"no_object": 1}
    assert sleeps == [] and len(service.bodies) == 1


def over(most: int, code: str = "output_too_large", named: bool = True) -> Any:
    """A service whose limit of one request is ``most`` images: a 413 with ``code``
    for more, naming (``named``) the first image over it, as the service's budgets do."""

    def refuse(uids: list[str]) -> Any:
        if len(uids) <= most:
            return None
        return error(413, code, image=most if named else None, field="heatmap.size")

    return refuse


@pytest.mark.parametrize(
    ("code", "named", "sizes"),
    [
        # Split before the image named: 7 fit; the series goes on 7 at a time.
        ("output_too_large", True, [8, 7, 1, 7, 1]),
        ("too_many_pixels", True, [8, 7, 1, 7, 1]),
        # No image named (memory, the body, the image count): in halves, then 4 at a time.
        ("over_memory_budget", False, [8, 4, 4, 4, 4]),
        ("too_many_images", False, [8, 4, 4, 4, 4]),
    ],
)
def test_a_batch_over_a_limit_of_the_request_is_split_and_every_image_explained(
    code: str, named: bool, sizes: list[int]
) -> None:
    """The 16 radiographs of 2900² that lost 9 images: a 413 about the whole request
    (its pictures, pixels, memory, images together) is not any one image's fault."""
    router, orthanc, service, sleeps = make(refuse=over(7, code, named), max_images_per_request=8)
    uids = orthanc.add_series("s1", 16)
    assert router.route("s1", 0.0) == "done"
    assert service.sizes() == sizes
    assert sorted(set(service.sent())) == sorted(uids)
    assert all(orthanc.results_of(uid) == ["OT"] for uid in uids)  # one each
    state = orthanc.state("s1")
    assert state["state"] == "done" and state["left_out"] == {}
    assert state["with_results"] == 16 and state["splits"] == 1
    assert sleeps == [] and orthanc.warnings == []
    assert router.status()["partial"] == {}


def test_an_image_refused_alone_is_left_out_and_the_series_is_partial() -> None:
    """An image whose request is too large even alone is left out with the code, the
    rest of its batch goes on; the series ends "partial", said once at WARNING by code
    and count, and listed by the status page for an operator to retry."""
    router, orthanc, service, sleeps = make(max_images_per_request=4)
    uids = orthanc.add_series("s1", 6)
    huge = uids[1]
    secret = {"error": {"code": "over_memory_budget", "message": "PHANTOM^NODULE 9000 MB"}}
    service.refuse = lambda sent: reply(413, secret) if huge in sent else None
    assert router.route("s1", 0.0) == "partial"
    # [0 1 2 3] refused; halves: [0 1] refused, [0] taken, [1] refused alone: left
    # out; [2 3] taken; then the rest 2 at a time (the largest batch taken).
    assert service.sizes() == [4, 2, 1, 1, 2, 2]
    state = orthanc.state("s1")
    assert state["state"] == "partial" and state["splits"] == 2
    assert list(state["left_out"]) == [huge] and "PHANTOM" in state["left_out"][huge]
    assert state["left_out_codes"] == {"over_memory_budget": 1}
    assert state["with_results"] == 5 and orthanc.results_of(huge) == []
    (warning,) = orthanc.warnings
    assert "series s1 partial" in warning and "over_memory_budget: 1" in warning
    assert "1 of 6" in warning and "PHANTOM" not in warning and huge not in warning
    status = router.status()
    assert status["partial"] == {"s1": {"over_memory_budget": 1}}
    assert status["left_out"] == {"over_memory_budget": 1} and status["failed"] == {}
    assert sleeps == []
    assert router.retry(None) == ["s1"]  # the retry route routes it again


def test_splitting_is_bounded_when_no_request_passes() -> None:
    """A service that refuses every request as too large: each image is tried alone
    once, a batch of n costs 2n - 1 requests, and the series ends partial."""
    refused = reply(413, {"error": {"code": "request_too_large", "message": "no"}})
    router, orthanc, service, sleeps = make(refuse=lambda uids: refused, max_images_per_request=8)
    uids = orthanc.add_series("s1", 8)
    assert router.route("s1", 0.0) == "partial"
    assert len(service.bodies) == 15 and service.sizes().count(1) == 8
    state = orthanc.state("s1")
    assert sorted(state["left_out"]) == sorted(uids)
    assert state["left_out_codes"] == {"request_too_large": 8}
    assert sleeps == []


def test_a_report_not_stored_is_retried_alone() -> None:
    """With a report asked for, an image is done when its report is stored too; a report
    whose store failed is asked for again, alone (heatmap format "none"), so the image
    gets no second Secondary Capture."""
    router, orthanc, service, sleeps = make(report="dicom-sr")
    (uid,) = orthanc.add_series("s1", 1)

    def report_lost(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> Any:
        if service.bodies:
            return service(url, body, headers, timeout_s)
        service.bodies.append(json.loads(body))
        orthanc.add_result(uid)  # the Secondary Capture was stored, the report not
        return reply(200, {"results": [stored(True, report=False)]})

    router._post = report_lost
    assert router.route("s1", 0.0) == "done"
    first, again = service.bodies
    assert first["heatmap"] == {"format": "dicom-sc"} and first["report"] == "dicom-sr"
    assert again["heatmap"] == {"format": "none"} and again["report"] == "dicom-sr"
    assert again["images"] == first["images"] and len(sleeps) == 1
    assert orthanc.results_of(uid) == ["OT", "SR"]
    state = orthanc.state("s1")
    assert state["with_results"] == 1 and state["retries"] == 1


def test_an_image_with_its_heatmap_but_no_report_is_sent_for_the_report() -> None:
    """Exactly once, by kind: a Secondary Capture stored before (a report asked for
    since, or its store lost) leaves only the report to make."""
    router, orthanc, service, _ = make(report="dicom-sr")
    uids = orthanc.add_series("s1", 2)
    orthanc.add_result(uids[0])
    assert router.route("s1", 0.0) == "done"
    assert [
        (b["heatmap"]["format"], b["images"][0]["dicomweb"]["instance"]) for b in service.bodies
    ] == [("none", uids[0]), ("dicom-sc", uids[1])]
    assert orthanc.results_of(uids[0]) == orthanc.results_of(uids[1]) == ["OT", "SR"]


@pytest.fixture
def running() -> Iterator[tuple[Any, FakeOrthanc, FakeService]]:
    router, orthanc, service, _ = make()
    yield router, orthanc, service
    router.stop()


def test_workers_route_what_becomes_stable_and_what_a_restart_left_pending(
    running: tuple[Any, FakeOrthanc, FakeService],
) -> None:
    router, orthanc, service = running
    orthanc.add_series("s1", 1)
    orthanc.add_series("s2", 1)
    # s2 was pending when Orthanc stopped last time.
    orthanc.properties[4602] = json.dumps({"pending": {"s2": 5.0}, "failed": {}})
    router.on_stable("s1")  # before the start: queued, saved at the start
    router.start()
    written(
        orthanc,
        lambda: all(
            f"/series/{s}/metadata/GradcamRouter" in orthanc.metadata for s in ("s1", "s2")
        ),
    )
    router.stop()
    assert orthanc.state("s2")["stable_at"] == 5.0
    assert json.loads(orthanc.properties[4602]) == {"pending": {}, "failed": {}, "partial": {}}
    assert sorted(service.sent()) == sorted(
        orthanc.instances[f"{s}-i1"]["uid"] for s in ("s1", "s2")
    )


def test_a_partial_series_stays_listed_until_a_retry_routes_it_whole(
    running: tuple[Any, FakeOrthanc, FakeService],
) -> None:
    router, orthanc, service = running
    uids = orthanc.add_series("s1", 3)
    service.refuse = lambda sent: error(413, "too_many_pixels") if uids[2] in sent else None
    router.start()
    router.on_stable("s1")
    # Saved once the worker is through with it: a restart of Orthanc keeps it listed.
    written(orthanc, lambda: orthanc.saved().get("partial") == {"s1": {"too_many_pixels": 1}})
    assert orthanc.state("s1")["state"] == "partial"
    assert router.status()["partial"] == {"s1": {"too_many_pixels": 1}}
    # The service's limit raised; the operator retries every failed and partial series.
    service.refuse = None
    assert router.retry(None) == ["s1"]
    written(orthanc, lambda: orthanc.saved() == {"pending": {}, "failed": {}, "partial": {}})
    assert orthanc.state("s1")["state"] == "done"
    assert router.status()["partial"] == {} and router.status()["left_out"] == {}
    assert orthanc.results_of(uids[2]) == ["OT"]


def written(orthanc: FakeOrthanc, condition: Callable[[], bool]) -> None:
    """Until what the router wrote to Orthanc makes ``condition()`` hold."""
    wait_until(
        condition,
        10,
        "the router's writes to Orthanc",
        detail=lambda: repr((orthanc.metadata, orthanc.properties)),
    )


def test_the_retry_route_refuses_what_is_not_a_list_of_ids() -> None:
    calls: dict[str, Any] = {}

    class Module:
        class ChangeType:
            STABLE_SERIES, ORTHANC_STARTED, ORTHANC_STOPPED = 2, 10, 11

        OrthancException = Exception

        def GetConfiguration(self) -> str:
            return substituted((RECIPE / "orthanc.json").read_text(), {})

        def RegisterOnChangeCallback(self, callback: Any) -> None:
            calls["change"] = callback

        def RegisterRestCallback(self, uri: str, callback: Any) -> None:
            calls[uri] = callback

        def LogWarning(self, message: str) -> None:
            calls.setdefault("log", []).append(message)

    class Output:
        def __init__(self) -> None:
            self.answer: tuple[Any, ...] = ()

        def AnswerBuffer(self, body: str, mime: str) -> None:
            self.answer = (200, json.loads(body))

        def SendHttpStatus(self, status: int, body: bytes) -> None:
            self.answer = (status, body)

        def SendMethodNotAllowed(self, allowed: str) -> None:
            self.answer = (405, allowed)

    router_module.install(Module())
    retry, status = calls["/gradcam/router/retry"], calls["/gradcam/router"]
    for body, expected in ((b'{"a": 1}', 400), (b"[1]", 400), (b"not json", 400)):
        output = Output()
        retry(output, "/gradcam/router/retry", method="POST", body=body)
        assert output.answer[0] == expected
    output = Output()
    retry(output, "/gradcam/router/retry", method="GET")
    assert output.answer == (405, "POST")
    output = Output()
    status(output, "/gradcam/router", method="GET")
    assert output.answer[1]["failed"] == {} and output.answer[1]["partial"] == {}
    assert output.answer[1]["left_out"] == {}
    assert "dicom-sc" in calls["log"][0]


# Volumes: a series sent whole to a volume model.

CT_RULE = {"Model": "ct3d", "Modalities": ["CT"]}


def volume_settings(*rules: dict[str, Any]) -> tuple[Any, ...]:
    configuration = json.loads(substituted((RECIPE / "orthanc.json").read_text(), {}))
    configuration["GradcamRouter"]["VolumeModels"] = list(rules)
    return router_module.RouterSettings.from_configuration(configuration).volume_models


def test_a_ct_series_goes_whole_to_its_volume_model_once() -> None:
    router, orthanc, service, _ = make(volume_models=volume_settings(CT_RULE), report="dicom-sr")
    uids = orthanc.add_series("ct", 24, modality="CT")
    assert router.route("ct", 90.0) == "done"
    (body,) = service.bodies
    assert body["model"] == "ct3d" and body["heatmap"] == {"format": "dicom-pm"}
    assert body["images"] == [
        {
            "dicomweb": {
                "url": DICOMWEB,
                "study": "1.2.840.1",
                "series": orthanc.series["ct"]["MainDicomTags"]["SeriesInstanceUID"],
            }
        }
    ]
    assert body["report"] == "dicom-sr" and body["store"] == {"url": DICOMWEB}
    state = orthanc.state("ct")
    assert state["state"] == "done" and state["with_results"] == 24
    assert orthanc.results_of(uids[0]) == ["OT", "SR"]
    assert router.route("ct", 95.0) == "done"  # its objects are there: nothing is sent
    assert len(service.bodies) == 1


def test_the_rules_pick_the_volume_model_by_modality_and_description() -> None:
    rules = volume_settings(
        {"Model": "lung3d", "Modalities": ["ct"], "SeriesDescription": "lung|thorax"},
        {"Model": "mr3d", "Modalities": ["MR"]},
    )
    router, orthanc, service, _ = make(volume_models=rules)
    orthanc.add_series("chest", 4, modality="CT")
    orthanc.series["chest"]["MainDicomTags"]["SeriesDescription"] = "THORAX 1.0 B70f"
    orthanc.add_series("head", 3, modality="CT")
    orthanc.series["head"]["MainDicomTags"]["SeriesDescription"] = "Head routine"
    orthanc.add_series("brain", 5, modality="MR")
    for series in ("chest", "head", "brain"):
        assert router.route(series, 0.0) == "done"
    models = [body.get("model") for body in service.bodies]
    # The head CT matches no rule: its images go as images, in batches of two.
    assert models == ["lung3d", None, None, "mr3d"]


def test_a_refused_volume_fails_its_series_and_a_busy_service_is_waited_for() -> None:
    refused = error(422, "invalid_volume", image=0)
    router, orthanc, service, sleeps = make(
        [reply(503, {"error": {"code": "overloaded", "message": "busy"}}), refused],
        volume_models=volume_settings(CT_RULE),
    )
    orthanc.add_series("ct", 6, modality="CT")
    assert router.route("ct", 0.0) == "failed"
    assert len(service.bodies) == 2 and len(sleeps) == 1
    state = orthanc.state("ct")
    assert state["state"] == "failed" and "invalid_volume" in state["reason"]


@pytest.mark.parametrize(
    ("rules", "named"),
    [
        ({"Model": "ct3d"}, "VolumeModels[0].Modalities"),
        ({"Modalities": ["CT"]}, "VolumeModels[0].Model"),
        ({"Model": "x", "Modalities": ["CT"], "SeriesDescription": "("}, "SeriesDescription"),
        ({"Model": "x", "Modalities": ["CT"], "Format": "png"}, "VolumeModels[0]"),
    ],
)
def test_a_wrong_volume_rule_is_named(rules: dict[str, Any], named: str) -> None:
    with pytest.raises(router_module.ConfigError, match=re.escape(named)):
        volume_settings(rules)


def test_a_wrong_volume_format_is_named() -> None:
    configuration = json.loads(
        substituted((RECIPE / "orthanc.json").read_text(), {"GRADCAM_ROUTER_VOLUME_FORMAT": "png"})
    )
    with pytest.raises(router_module.ConfigError, match="VolumeFormat"):
        router_module.RouterSettings.from_configuration(configuration)
