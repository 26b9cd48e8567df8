"""gradcam-service: Grad-CAM explanations of image classifiers over HTTP."""

from importlib.metadata import PackageNotFoundError, version


def package_version(fallback: str = "unknown (not installed)") -> str:
    """The installed distribution's version (what ``--version``, ``GET /v2`` and the
    DICOM objects' Software Versions say); ``fallback`` from a checkout not installed."""
    try:
        return version("gradcam-service")
    except PackageNotFoundError:
        return fallback
