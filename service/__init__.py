"""gradcam-service: Grad-CAM explanations of image classifiers over HTTP."""

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The installed distribution's version (what ``--version`` and ``GET /v2`` say)."""
    try:
        return version("gradcam-service")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"
