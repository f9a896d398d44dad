from pathlib import Path

import pytest

from unclip.pipelines.config import ConfigError, load_config, parse_override

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["demo.yaml", "laion.yaml", "cc3m.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.storage
    assert cfg.prior.trainer.zero_stage in (0, 1, 2, 3)


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "c.yaml"
    f.write_text("storage: ../out\nsources: [lists/a.parquet, s3://b/c.parquet]\n")
    cfg = load_config(f)
    assert cfg.storage == str(tmp_path / "out")
    assert cfg.sources == [str(tmp_path / "sub" / "lists" / "a.parquet"), "s3://b/c.parquet"]


def test_prior_init_from_resolves_against_the_config_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("storage: out\nprior:\n  init_from: weights/karlo-prior\n")
    assert load_config(f).prior.init_from == str(tmp_path / "weights" / "karlo-prior")
    f.write_text("storage: out\nprior:\n  init_from: s3://bucket/prior\n")
    assert load_config(f).prior.init_from == "s3://bucket/prior"


def test_misspelled_key_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("storage: x\nprior:\n  trainer:\n    max_stpes: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(f) in str(e.value)
    assert "prior.trainer.max_stpes" in str(e.value)
    assert "unknown key" in str(e.value)


def test_wrong_type_names_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("storage: x\ningest:\n  image_size: big\n")
    with pytest.raises(ConfigError, match=r"ingest\.image_size"):
        load_config(f)


def test_zero_stage_out_of_range_is_rejected(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("storage: x\nprior:\n  trainer:\n    zero_stage: 4\n")
    with pytest.raises(ConfigError, match=r"prior\.trainer\.zero_stage"):
        load_config(f)


def test_missing_storage_and_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 1\n")
    with pytest.raises(ConfigError, match="storage"):
        load_config(f)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_merge_into_nested_sections(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("storage: x\nprior:\n  num_layers: 2\n")
    cfg = load_config(f, parse_override("prior.trainer.max_steps=7"))
    assert cfg.prior.trainer.max_steps == 7
    assert cfg.prior.num_layers == 2
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("prior.trainer.max_steps")


def test_relative_paths_resolve_where_they_were_written(tmp_path, monkeypatch):
    """In the config: against its folder. In UNCLIP_STORAGE or --set: against the working directory."""
    import yaml

    from unclip.pipelines.cli_options import load_cli_config

    cfg_dir, work = tmp_path / "configs", tmp_path / "work"
    cfg_dir.mkdir()
    work.mkdir()
    config = cfg_dir / "c.yaml"
    config.write_text(yaml.safe_dump({"storage": "store", "sensor": {"incoming": "inbox"}}))
    monkeypatch.chdir(work)
    monkeypatch.delenv("UNCLIP_STORAGE", raising=False)
    cfg, _ = load_cli_config(config, None)
    assert cfg.storage == str(cfg_dir / "store")
    assert cfg.sensor.incoming == str(cfg_dir / "inbox")
    monkeypatch.setenv("UNCLIP_STORAGE", "./x")
    assert load_cli_config(config, None)[0].storage == str(work / "x")
    monkeypatch.delenv("UNCLIP_STORAGE")
    assert load_cli_config(config, ["storage=y"])[0].storage == str(work / "y")


def test_buffered_bytes_per_task_are_capped_by_config():
    import pytest

    from unclip.pipelines.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"2 × thread_count \(64\) × max_image_bytes"):
        parse_config({"storage": "/tmp/x", "ingest": {"thread_count": 64}})
    ok = parse_config(
        {"storage": "/tmp/x", "ingest": {"thread_count": 64, "max_image_bytes": 16 << 20}}
    )
    assert 2 * 64 * ok.ingest.max_image_bytes <= ok.ingest.max_buffered_bytes


def test_cc3m_config_reads_cc3ms_headerless_tsv_with_a_pretrained_clip(tmp_path):
    import shutil
    import warnings

    from unclip.datasets import url_lists
    from unclip.pipelines import sources
    from unclip.pipelines.config import clip_input_size

    shutil.copy(REPO / "configs" / "cc3m.yaml", tmp_path / "cc3m.yaml")
    tsv = tmp_path / "data" / "cc3m" / "Train_GCC-training.tsv"
    tsv.parent.mkdir(parents=True)
    tsv.write_text(
        "a very typical bus station\thttp://lh6.example.com/a.jpg\n"
        "sierra looked stunning in this top\thttp://example.org/b.jpg\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: 224 px is ViT-B/32's input
        cfg = load_config(tmp_path / "cc3m.yaml")
    assert (cfg.clip.model_name, cfg.clip.pretrained) == ("ViT-B-32", "openai")
    assert clip_input_size(cfg.clip) == 224 == cfg.ingest.image_size
    assert [g.metric for g in cfg.promotion.models["decoder"]] == ["fd_clip", "clip_score"]
    (listed,) = sources.configured_lists(cfg)
    assert listed.path == str(tsv)
    icfg = sources.ingest_config_of(cfg, url_lists.source_id(str(tsv)), str(tsv))
    table = url_lists.read_url_list(str(tsv), icfg)
    assert table.column("url").to_pylist() == [
        "http://lh6.example.com/a.jpg",
        "http://example.org/b.jpg",
    ]
    assert table.column("caption").to_pylist()[0] == "a very typical bus station"
    # read as if it had a header, its first row would be the column names: the column check says so
    with pytest.raises(ValueError, match="missing column 'url'"):
        url_lists.read_url_list(str(tsv), icfg.model_copy(update={"list_columns": None}))


def test_a_redirect_limit_past_what_urllib_can_follow_is_a_config_error(tmp_path):
    """Beyond ~150 hops urllib recurses too deep: the bound is checked when the config loads."""
    f = tmp_path / "c.yaml"
    f.write_text("storage: s\ningest:\n  max_redirects: 500\n")
    with pytest.raises(ConfigError, match="max_redirects"):
        load_config(f)
    f.write_text("storage: s\ningest:\n  max_redirects: 50\n")
    assert load_config(f).ingest.max_redirects == 50
