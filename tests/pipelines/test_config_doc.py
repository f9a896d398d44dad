from pathlib import Path

from unclip.pipelines.config_doc import render

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_config_reference_is_current():
    assert DOC.read_text() == render(), (
        "regenerate: python -m unclip.pipelines.config_doc > docs/config.md"
    )


def test_reference_lists_nested_keys():
    text = render()
    for key in (
        "`storage`",
        "`ingest.image_size`",
        "`prior.trainer.zero_stage`",
        "`decoder.image_size`",
    ):
        assert key in text
