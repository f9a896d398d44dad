import dagster as dg

from unclip.pipelines.definitions import build_definitions


def test_definitions_load_with_the_stage_graph(tmp_path):
    defs = build_definitions(str(tmp_path / "c.yaml"))
    job = defs.resolve_job_def("pipeline")
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {
        "url_lists",
        "image_shards",
        "clip_model",
        "embeddings",
        "dataset_manifest",
        "prior",
        "decoder",
        "evaluation",
    }
    parents = {k.to_user_string() for k in graph.get(dg.AssetKey("evaluation")).parent_keys}
    assert parents == {"dataset_manifest", "clip_model", "prior", "decoder"}
    assert job is not None
