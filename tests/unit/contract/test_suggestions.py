""" "Did you mean ...?" wherever a name is mistyped: in messages, in the error body's
``suggestions``, and on the command line."""

from __future__ import annotations

import pytest

from service.cli import main
from service.contract.errors import ServiceError
from service.contract.request_parsing import parse_explain_request
from service.contract.suggestions import close_matches, did_you_mean
from service.engine.runtime import Runtime
from service.pipeline.images import choose_layer, resolve_targets


def test_close_matches_ignore_case_and_unrelated_words() -> None:
    assert close_matches("phantm", ["phantom", "resnet50"]) == ["phantom"]
    assert close_matches("ResNet50", ["resnet50"]) == ["resnet50"]
    assert close_matches("xyz", ["phantom", "resnet50"]) == []
    assert did_you_mean([]) == ""
    assert did_you_mean(["a", "b", "c"]) == " Did you mean 'a', 'b' or 'c'?"


@pytest.mark.parametrize(
    "body, field, suggested",
    [
        (b'{"images": ["a"], "method": "gradcm"}', "method", "gradcam"),
        (b'{"images": ["a"], "heatmap": {"format": "overlya"}}', "heatmap.format", "overlay"),
        (b'{"images": ["a"], "heatmap": {"fromat": "png"}}', "heatmap.fromat", "format"),
        (b'{"imges": ["a"]}', "imges", "images"),
        (b'{"images": ["a"], "include": ["imag"]}', "include[0]", "image"),
    ],
)
def test_a_mistyped_field_or_value_names_the_close_match(
    body: bytes, field: str, suggested: str
) -> None:
    with pytest.raises(ServiceError) as refused:
        parse_explain_request(body)
    error = refused.value
    assert error.status == 422 and error.field == field
    assert error.suggestions and error.suggestions[0] == suggested
    assert f"Did you mean '{suggested}'" in error.message
    body_out = error.to_response().error
    assert body_out.suggestions == error.suggestions


def test_unknown_model_layer_and_label_suggest(runtime: Runtime) -> None:
    catalog = runtime.catalog()
    with pytest.raises(ServiceError) as model:
        catalog.get("phantm")
    assert (
        model.value.suggestions == ["phantom"] and "Did you mean 'phantom'?" in model.value.message
    )
    info = catalog.get(None)
    with pytest.raises(ServiceError) as layer:
        choose_layer(info, "featurs")
    assert layer.value.suggestions and layer.value.suggestions[0] == "features"
    with pytest.raises(ServiceError) as label:
        resolve_targets("nodul", info, 0)
    assert label.value.suggestions == ["nodule"]
    # The suggestions survive the trip from the engine process to an HTTP worker.
    again = ServiceError.from_wire(label.value.to_wire())
    assert again.suggestions == ["nodule"] and again.code == "unknown_label"


def test_the_cli_suggests_choices_and_models(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as usage:
        main(["explain", "x.png", "--method", "gradcm"])
    assert usage.value.code == 2
    assert "'gradcm' is not one of" in capsys.readouterr().err
    assert main(["layers", "--model", "phantm"]) == 2
    assert "Did you mean 'phantom'?" in capsys.readouterr().err
