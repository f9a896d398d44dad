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


def test_a_dict_of_rules_renders_as_a_dict_with_its_example_and_per_column_keys():
    rows = {line.split(" | ")[0].strip("| `"): line for line in render().splitlines()}
    metadata = rows["ingest.filters.metadata"]
    assert "dict[str, MetadataRule]" in metadata and "{punsafe: {lt: 0.5}" in metadata
    assert "ingest.filters.metadata.<column>.lt" in rows
    assert "ingest.filters.metadata.lt" not in rows  # not one rule: a rule per column
    assert "sources[].url_col" in rows and "promotion.models.<model>[].metric" in rows
