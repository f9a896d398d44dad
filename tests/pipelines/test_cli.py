import json
import os
import shutil
import subprocess
import sys

from tiny import ASSETS_IN_ORDER
from typer.testing import CliRunner

from unclip.pipelines.cli import app
from unclip.pipelines.runner import upstream_names

runner = CliRunner()


COMMANDS = [
    "run",
    "ingest",
    "curate",
    "embed",
    "train",
    "evaluate",
    "sample",
    "export",
    "status",
    "ui",
    "config-schema",
    "import-embeddings",
    "export-embeddings",
]
# Every command that reads a pipeline config, with the arguments before the config path.
CONFIG_COMMANDS = [
    ["run"],
    ["ingest"],
    ["curate"],
    ["embed"],
    ["train", "prior"],
    ["train", "decoder"],
    ["train", "upsampler"],
    ["evaluate"],
    ["status"],
]


def _bad_config(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(f"storage: {tmp_path / 'store'}\ningest:\n  imagesize: 64\n")
    return f


def test_every_listed_command_runs_and_no_other():
    listed = runner.invoke(app, ["--help"])
    assert listed.exit_code == 0
    for cmd in COMMANDS:
        sub = runner.invoke(app, [cmd, "--help"])
        assert sub.exit_code == 0, (cmd, sub.output)
        assert f" {cmd} " in sub.output.split("\n", 2)[1] + " ", (cmd, sub.output)  # its usage line
    for model in ("prior", "decoder", "upsampler"):
        assert runner.invoke(app, ["train", model, "--help"]).exit_code == 0
    bad = runner.invoke(app, ["train", "clip"])
    assert bad.exit_code == 2 and "No such command 'clip'" in bad.output
    assert runner.invoke(app, ["frobnicate"]).exit_code == 2


def test_every_config_command_checks_its_config_before_any_work(tmp_path):
    f = _bad_config(tmp_path)
    for cmd in CONFIG_COMMANDS:
        result = runner.invoke(app, [*cmd, str(f)])
        assert result.exit_code == 2, (cmd, result.output)
        assert "ingest.imagesize: unknown key" in result.output and str(f) in result.output, cmd
    assert not (tmp_path / "store").exists()


def test_console_script_is_installed(tmp_path):
    """The ``unclip`` script pip installed beside this interpreter, run as a user runs it."""
    script = shutil.which("unclip", path=os.path.dirname(sys.executable))
    assert script, f"no unclip console script in {os.path.dirname(sys.executable)}"
    f = _bad_config(tmp_path)
    out = subprocess.run([script, "ingest", str(f)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "ingest.imagesize: unknown key" in out.stdout + out.stderr
    schema = subprocess.run([script, "config-schema"], capture_output=True, text=True, timeout=300)
    assert schema.returncode == 0
    assert json.loads(schema.stdout)["properties"]["promotion"]


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


def test_ui_runs_dagster_dev_on_the_same_definitions_and_instance(tmp_path, monkeypatch):
    from unclip.pipelines.cli import ui_command
    from unclip.pipelines.config import load_config

    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    f = tmp_path / "c.yaml"
    f.write_text(f"storage: {tmp_path / 'store'}\n")
    help_ = runner.invoke(app, ["ui", "--help"])
    assert help_.exit_code == 0 and "--port" in help_.output
    cmd, env = ui_command(f, load_config(f), port=3111)
    assert cmd[1:6] == ["-m", "dagster", "dev", "-m", "unclip.pipelines.definitions"]
    assert "3111" in cmd
    assert env["UNCLIP_CONFIG"] == str(f.resolve())
    assert env["DAGSTER_HOME"] == str(tmp_path / "store" / "dagster")
    assert (tmp_path / "store" / "dagster" / "dagster.yaml").exists()


def test_status_on_an_empty_store(tmp_path, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    f = tmp_path / "c.yaml"
    f.write_text(f"storage: {tmp_path / 'store'}\n")
    result = runner.invoke(app, ["status", str(f)])
    assert result.exit_code == 0, result.output
    assert "dataset version" in result.output and "promoted prior" in result.output
    assert "promoted upsampler" not in result.output  # the config has no upsampler
    # the store exists now; a config that names no data (to sample or export) still has a status
    (tmp_path / "store").mkdir(exist_ok=True)
    result = runner.invoke(app, ["status", str(f)])
    assert result.exit_code == 0, result.output
    assert "0 registered, 0 ingested" in result.output


def test_single_stage_commands_select_their_upstream():
    assert upstream_names(["image_shards"]) == ["url_lists", "image_shards"]
    assert upstream_names(["prior"]) == list(ASSETS_IN_ORDER[: ASSETS_IN_ORDER.index("prior") + 1])
    assert upstream_names(["curated_embeddings"])[-1] == "curated_embeddings"


# --- unclip sample ---------------------------------------------------------------------------
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tiny_exports import build_tiny_store  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A storage root whose latest and promoted CLIP, prior, decoder and upsampler are untrained
    tiny exports, plus an upsampler export that takes 8 px images (not the decoder's 16)."""
    root = tmp_path_factory.mktemp("sample")
    config = root / "c.yaml"
    exports, dim = build_tiny_store(root, config)
    return config, exports, dim


def _sample(config, tmp_path, *args):
    out = tmp_path / "png"
    result = runner.invoke(app, ["sample", *args, "--config", str(config), "--out", str(out)])
    return result, sorted(out.glob("*.png")) if out.exists() else []


def test_sample_runs_prior_decoder_upsampler_and_writes_pngs(trained, tmp_path):
    config, _, _ = trained
    result, pngs = _sample(config, tmp_path, "a red circle", "a blue square", "--n", "1")
    assert result.exit_code == 0, result.output
    assert [p.name for p in pngs] == ["a-blue-square-0.png", "a-red-circle-0.png"]
    with Image.open(pngs[0]) as im:
        assert im.size == (32, 32)  # the upsampler's output size
    result, pngs = _sample(config, tmp_path / "lo", "a red circle", "--n", "1", "--no-upsampler")
    with Image.open(pngs[0]) as im:
        assert result.exit_code == 0 and im.size == (16, 16)


def test_sample_variation_and_interpolation(trained, tmp_path):
    config, _, _ = trained
    src = tmp_path / "in.png"
    Image.new("RGB", (40, 40), "red").save(src)
    result, pngs = _sample(config, tmp_path / "v", "--variation", str(src), "--n", "2")
    assert result.exit_code == 0, result.output
    assert [p.name for p in pngs] == ["variation-in-0.png", "variation-in-1.png"]
    args = ["--interpolate", "a red circle", "a blue square", "--frames", "3"]
    result, pngs = _sample(config, tmp_path / "i", *args)
    assert result.exit_code == 0, result.output
    assert len(pngs) == 3 and pngs[0].name == "a-red-circle-to-a-blue-square-00.png"


@pytest.mark.parametrize(
    "args, message",
    [
        (["a red circle " * 10], "longer than the CLIP context"),
        (["a red circle", "  "], "empty caption"),
        (["--interpolate", "a red circle", ""], "empty caption"),
        (["a red circle", "--guidance", "0"], "guidance scale must be > 0"),
        (["a red circle", "--guidance", "-2"], "guidance scale must be > 0"),
        ([], "give captions, --variation, --interpolate or --embedding"),
    ],
)
def test_sample_bad_input_is_exit_code_2(trained, tmp_path, args, message):
    config, _, _ = trained
    result, pngs = _sample(config, tmp_path, *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and not pngs


def test_sample_refuses_an_upsampler_of_another_input_size(trained, tmp_path):
    config, exports, _ = trained
    result, pngs = _sample(config, tmp_path, "a red circle", "--upsampler", exports["up8"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "takes 8 px images but the decoder makes 16 px" in text and not pngs


def test_sample_decodes_embeddings_and_refuses_the_wrong_dimension(trained, tmp_path):
    config, _, dim = trained
    good, bad = tmp_path / "good.npy", tmp_path / "bad.npy"
    np.save(good, np.random.default_rng(0).normal(size=(2, dim)).astype(np.float32))
    np.save(bad, np.zeros((2, dim + 3), np.float32))
    result, pngs = _sample(config, tmp_path / "g", "--embedding", str(good), "--no-upsampler")
    assert result.exit_code == 0, result.output
    assert len(pngs) == 2
    result, pngs = _sample(config, tmp_path / "b", "--embedding", str(bad))
    assert result.exit_code == 2 and f"[N, {dim}]" in result.output and not pngs


def test_ui_runs_on_the_storage_root_of_unclip_storage(tmp_path, monkeypatch):
    from unclip.pipelines import ui as dagster_ui

    started = {}
    monkeypatch.setattr(dagster_ui, "missing_distributions", lambda: [])
    monkeypatch.setattr(
        dagster_ui, "run_until_stopped", lambda cmd, env: started.update(cmd=cmd, env=env) or 0
    )
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.setenv("UNCLIP_STORAGE", str(tmp_path / "elsewhere"))
    f = tmp_path / "c.yaml"
    f.write_text(f"storage: {tmp_path / 'store'}\n")
    result = runner.invoke(app, ["ui", str(f)])
    assert result.exit_code == 0, result.output
    assert started["env"]["DAGSTER_HOME"] == str(tmp_path / "elsewhere" / "dagster")
    assert started["env"]["UNCLIP_STORAGE"] == str(tmp_path / "elsewhere")  # definitions read it
    refused = runner.invoke(app, ["ui", str(f), "--set", "ray.num_cpus=1"])
    assert refused.exit_code == 2 and "takes no --set" in refused.output


def test_export_reproduces_sample_bit_for_bit(trained, tmp_path):
    from unclip import UnclipPipeline

    config, _, _ = trained
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "model_index.json").is_file() and (
        out / "clip" / "open_clip_config.json"
    ).is_file()
    card = (out / "README.md").read_text()
    assert "| decoder | `decoder` | promoted |" in card and '"m": 1.0' in card
    result, pngs = _sample(config, tmp_path, "a red circle", "--n", "2", "--seed", "4")
    assert result.exit_code == 0, result.output
    pipe = UnclipPipeline.from_pretrained(str(out))
    images = pipe(["a red circle"], num_images_per_prompt=2, seed=4, output_type="np").images
    for png, image in zip(pngs, images, strict=True):
        with Image.open(png) as im:
            np.testing.assert_array_equal(np.asarray(im), image)


def test_export_of_a_named_run_and_bad_names(trained, tmp_path):
    config, _, _ = trained
    result = runner.invoke(
        app, ["export", str(config), "--out", str(tmp_path / "x"), "--run", "decoder=nope"]
    )
    assert result.exit_code == 1 and "decoder run 'nope'" in " ".join(result.output.split())
    result = runner.invoke(
        app, ["export", str(config), "--out", str(tmp_path / "x"), "--run", "vae=a"]
    )
    assert result.exit_code == 2 and "no such model" in result.output
    assert not (tmp_path / "x").exists()


def test_sample_uses_the_promoted_runs_unless_told_latest(trained, tmp_path):
    from unclip.datasets.storage import StorageLayout, read_json, write_json
    from unclip.pipelines.config import load_config

    config, exports, _ = trained
    layout = StorageLayout(load_config(config).storage)
    record = read_json(layout.registry("upsampler"))
    write_json(layout.registry("upsampler"), {**record, "export": exports["up8"]})
    try:
        result, pngs = _sample(config, tmp_path / "p", "a red circle", "--n", "1")
        assert result.exit_code == 2 and "takes 8 px images" in " ".join(result.output.split())
        result, pngs = _sample(config, tmp_path / "l", "a red circle", "--n", "1", "--latest")
        assert result.exit_code == 0 and len(pngs) == 1, result.output
    finally:
        write_json(layout.registry("upsampler"), record)


def test_sample_device_flag(trained, tmp_path):
    config, _, _ = trained
    result, pngs = _sample(config, tmp_path / "c", "a red circle", "--n", "1", "--device", "cpu")
    assert result.exit_code == 0 and len(pngs) == 1, result.output
    if not torch.cuda.is_available():
        result, pngs = _sample(config, tmp_path / "g", "a red circle", "--device", "cuda")
        assert result.exit_code == 2 and "no CUDA GPU" in result.output and not pngs


def test_sample_finds_its_config_or_says_how_to_give_one(trained, tmp_path, monkeypatch):
    config, _, _ = trained
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("UNCLIP_CONFIG", raising=False)
    result = runner.invoke(app, ["sample", "a red circle"])
    assert result.exit_code == 2
    assert "no pipeline config found" in result.output and "UNCLIP_CONFIG" in result.output
    monkeypatch.setenv("UNCLIP_CONFIG", str(config))
    result = runner.invoke(app, ["sample", "a red circle", "--n", "1", "--out", "png"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "png").glob("*.png"))) == 1
