import json

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from unclip.datasets import url_lists
from unclip.pipelines.definitions import build_definitions
from unclip.pipelines.resources import UnclipConfigResource
from unclip.pipelines.sensors import INGEST_JOB, evaluate_inbox
from unclip.pipelines.stages import source_lists


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
