import gzip
import io
import json

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from unclip.datasets import url_lists
from unclip.pipelines.definitions import build_definitions
from unclip.pipelines.resources import UnclipConfigResource
from unclip.pipelines.sensors import INGEST_JOB, evaluate_inbox
from unclip.pipelines.sources import source_lists


def _setup(tmp_path):
    store = tmp_path / "store"
    inbox = store / "incoming"
    inbox.mkdir(parents=True)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"storage": str(store), "sensor": {"min_age_seconds": 0}}))
    return config, store, inbox


def _good_list(path, n=3):
    pq.write_table(
        pa.table(
            {
                "url": [f"http://127.0.0.1:9/{i}.png" for i in range(n)],
                "caption": [f"a red circle {i}" for i in range(n)],
            }
        ),
        path,
    )


def test_sensor_turns_a_good_list_into_a_partition_and_moves_a_bad_one_aside(tmp_path):
    config, store, inbox = _setup(tmp_path)
    _good_list(inbox / "good.parquet")
    (inbox / "bad.csv").write_text("url,text\nhttp://x/1.png,hello\n")
    (inbox / ".partial.parquet").write_text("still uploading")
    sid = url_lists.source_id(str(inbox / "good.parquet"))

    defs = build_definitions(str(config))
    sensor = defs.resolve_sensor_def("inbox")
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(
            instance=instance, resources={"unclip": UnclipConfigResource(config_path=str(config))}
        )
        result = sensor(ctx)
    assert [r.partition_key for r in result.run_requests] == [sid]
    assert result.run_requests[0].job_name == INGEST_JOB
    assert result.run_requests[0].run_key == f"source-{sid}"
    (add,) = result.dynamic_partitions_requests
    assert add.partitions_def_name == "sources" and list(add.partition_keys) == [sid]

    # the good list moved to _accepted and registered: the partition finds it by key
    accepted = inbox / "_accepted" / sid / "good.parquet"
    assert accepted.exists() and not (inbox / "good.parquet").exists()
    from unclip.pipelines.config import load_config

    assert source_lists(load_config(config), [sid]) == {sid: str(accepted)}
    # the bad one moved aside with an error naming the missing column; the hidden file stays
    err = (inbox / "_rejected" / "bad.csv.error.txt").read_text()
    assert "missing column 'caption'" in err
    assert (inbox / "_rejected" / "bad.csv").exists() and not (inbox / "bad.csv").exists()
    assert (inbox / ".partial.parquet").exists()

    # next tick: nothing new, nothing requested
    again = evaluate_inbox(load_config(config), result.cursor)
    assert not again.run_requests and "no new URL lists" in again.skip_reason.skip_message


def test_cursor_skips_a_list_it_could_not_move_but_not_a_new_one_under_that_name(tmp_path):
    from unclip.pipelines import sources
    from unclip.pipelines.config import load_config

    config, store, inbox = _setup(tmp_path)
    cfg = load_config(config)
    _good_list(inbox / "a.parquet")
    (f,) = sources.inbox_files(cfg)
    cursor = json.dumps({f.name: f.fingerprint})
    assert not evaluate_inbox(cfg, cursor).run_requests
    _good_list(inbox / "a.parquet", n=5)  # new content, new size
    assert len(evaluate_inbox(cfg, cursor).run_requests) == 1


def test_empty_and_unknown_format_lists_are_rejected(tmp_path):
    from unclip.pipelines.config import load_config

    config, store, inbox = _setup(tmp_path)
    _good_list(inbox / "empty.parquet", n=0)
    (inbox / "notes.txt").write_text("hello")
    result = evaluate_inbox(load_config(config), None)
    assert not result.run_requests
    assert "no rows" in (inbox / "_rejected" / "empty.parquet.error.txt").read_text()
    assert "unknown URL list format" in (inbox / "_rejected" / "notes.txt.error.txt").read_text()
    assert "rejected 2" in result.skip_reason.skip_message


def _bad_inbox_files(inbox) -> dict[str, str]:
    """Each kind of bad list, by name → a word its rejection reason must hold."""
    good = io.BytesIO()
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.png"], "caption": ["a"]}), good)
    gz = gzip.compress(b"url,caption\n" + b"http://127.0.0.1:9/x.png,a red circle\n" * 200)
    (inbox / "truncated.csv.gz").write_bytes(gz[: len(gz) // 2])
    corrupt = bytearray(gz)
    corrupt[20:60] = b"\xff" * 40
    (inbox / "corrupt.csv.gz").write_bytes(bytes(corrupt))
    pq.write_table(
        pa.table({"url": [["http://127.0.0.1:9/a.png"]], "caption": ["a list as url"]}),
        inbox / "listurl.parquet",
    )
    pq.write_table(
        pa.table({"url": [{"u": "http://127.0.0.1:9/a.png"}], "caption": ["a struct as url"]}),
        inbox / "structurl.parquet",
    )
    (inbox / "garbage.parquet").write_bytes(b"PAR1" + b"\x00" * 50 + good.getvalue()[-40:])
    (inbox / "bomb.csv.gz").write_bytes(gzip.compress(b"url,caption\n" + b"a" * 3_000_000))
    return {
        "truncated.csv.gz": "truncated gzip",
        "corrupt.csv.gz": "corrupt gzip",
        "listurl.parquet": "column 'url' must hold strings",
        "structurl.parquet": "column 'url' must hold strings",
        "garbage.parquet": "cannot parse as parquet",
        "bomb.csv.gz": "max_url_list_bytes=1000000",
    }


def test_every_bad_file_is_rejected_with_its_reason_and_the_good_ones_still_run(tmp_path):
    from unclip.pipelines.config import load_config

    config, store, inbox = _setup(tmp_path)
    _good_list(inbox / "a-good.parquet")  # sorted before the bad ones
    reasons = _bad_inbox_files(inbox)
    _good_list(inbox / "z-good.parquet", n=4)  # and after them
    cfg = load_config(config, {"ingest": {"max_url_list_bytes": 1_000_000}})
    result = evaluate_inbox(cfg, None)
    assert len(result.run_requests) == 2
    assert {r.tags["unclip/list"] for r in result.run_requests} == {
        "a-good.parquet",
        "z-good.parquet",
    }
    for name, reason in reasons.items():
        assert reason in (inbox / "_rejected" / f"{name}.error.txt").read_text(), name
        assert not (inbox / name).exists()
    again = evaluate_inbox(cfg, result.cursor)  # the next tick has nothing left to choke on
    assert not again.run_requests and "no new URL lists" in again.skip_reason.skip_message


def test_a_second_rejected_file_of_the_same_name_keeps_the_first(tmp_path):
    from unclip.pipelines.config import load_config

    config, store, inbox = _setup(tmp_path)
    cfg = load_config(config)
    (inbox / "bad.csv").write_text("url,text\nhttp://x/1.png,first\n")
    evaluate_inbox(cfg, None)
    (inbox / "bad.csv").write_text("url,text\nhttp://x/1.png,second one\n")
    evaluate_inbox(cfg, None)
    rejected = inbox / "_rejected"
    assert "first" in (rejected / "bad.csv").read_text()
    assert "second one" in (rejected / "bad.csv~2").read_text()
    assert (rejected / "bad.csv~2.error.txt").exists()


def test_the_inbox_on_an_s3_api_server(s3_root, tmp_path):
    """Listing, moving and rejecting through s3fs (whose listings are cached) on moto, loopback."""
    import s3fs

    from unclip.pipelines.config import parse_config

    cfg = parse_config(
        {
            "storage": str(tmp_path / "store"),
            "sensor": {"min_age_seconds": 0, "incoming": f"{s3_root}/incoming"},
        }
    )
    fs = s3fs.S3FileSystem(skip_instance_cache=True)  # another client: the uploader's
    inbox = s3_root[len("s3://") :] + "/incoming"
    local = tmp_path / "lists"
    local.mkdir()
    _good_list(local / "good.parquet")
    fs.put(str(local / "good.parquet"), f"{inbox}/good.parquet")
    fs.pipe(f"{inbox}/bad.csv", b"url,text\nhttp://x/1.png,hello\n")
    result = evaluate_inbox(cfg, None)
    assert [r.tags["unclip/list"] for r in result.run_requests] == ["good.parquet"]
    assert "missing column 'caption'" in fs.cat(f"{inbox}/_rejected/bad.csv.error.txt").decode()
    sensor_fs = s3fs.S3FileSystem()  # the instance the sensor's fsspec calls share
    sensor_fs.ls(inbox)  # its cached listing, as a long-running sensor daemon has it
    fs.pipe(f"{inbox}/more.parquet", _parquet_bytes(5))
    again = evaluate_inbox(cfg, result.cursor)  # sees the new file, not the moved ones
    assert [r.tags["unclip/list"] for r in again.run_requests] == ["more.parquet"]
    sid = again.run_requests[0].partition_key
    assert fs.exists(f"{inbox}/_accepted/{sid}/more.parquet")


def _parquet_bytes(n: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(
        pa.table({"url": [f"http://127.0.0.1:9/m{i}.png" for i in range(n)], "caption": ["c"] * n}),
        buf,
    )
    return buf.getvalue()
