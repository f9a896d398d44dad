import subprocess
import sys

from typer.testing import CliRunner

from unclip.pipelines.cli import _upstream_closure, app

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ["run", "ingest", "embed", "train", "evaluate", "sample", "status"]:
        assert cmd in result.output
    train = runner.invoke(app, ["train", "--help"])
    assert "prior" in train.output and "decoder" in train.output


def test_console_script_is_installed():
    out = subprocess.run(
        [sys.executable, "-m", "unclip.pipelines.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "unclip" in out.stdout


def test_bad_config_fails_before_any_work(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(f"storage: {tmp_path / 'store'}\ningest:\n  imagesize: 64\n")
    result = runner.invoke(app, ["run", str(f)])
    assert result.exit_code == 2
    assert "ingest.imagesize" in result.output and str(f) in result.output
    assert not (tmp_path / "store").exists()


def test_sample_without_trained_models_says_what_to_run(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(f"storage: {tmp_path / 'store'}\nsynthetic: {{num_pairs: 10}}\n")
    result = runner.invoke(app, ["sample", "a red circle", "--config", str(f)])
    assert result.exit_code == 1
    assert "unclip run" in result.output


def test_single_stage_commands_select_their_upstream():
    assert _upstream_closure(["image_shards"]) == ["url_lists", "image_shards"]
    assert _upstream_closure(["prior"]) == [
        "url_lists",
        "image_shards",
        "clip_model",
        "embeddings",
        "dataset_manifest",
        "prior",
    ]
