from unclip.training.config import DecoderConfig, PriorConfig, TrainerConfig
from unclip.training.engine.fit_result import run_name_for


def _name(cfg):
    return run_name_for("prior", cfg, 0.05, data_version="v1", seed=0)


def test_sampling_and_bookkeeping_keep_the_run():
    base = PriorConfig()
    same = PriorConfig(
        guidance_scale=4.0,
        sample_steps=10,
        candidates=4,
        trainer=TrainerConfig(checkpoint_every=7, keep_last=5, log_every=3, max_failures=2),
    )
    assert _name(base) == _name(same)
    assert DecoderConfig(guidance_scale=1.5).identity() == DecoderConfig().identity()
    # The starting weights name the run by their content (PriorTask.run_name), not their path.
    assert "init_from" not in PriorConfig(init_from="/a/prior").identity()


def test_what_shapes_the_model_changes_the_run():
    base = _name(PriorConfig())
    assert _name(PriorConfig(trainer=TrainerConfig(max_steps=7))) != base
    assert _name(PriorConfig(num_layers=2)) != base
    assert run_name_for("prior", PriorConfig(), 0.05, data_version="v2", seed=0) != base
    assert run_name_for("prior", PriorConfig(), 0.05, data_version="v1", seed=1) != base


def test_text_tokens_names_a_new_run_only_when_on():
    # Added after runs were named: off (the default) it is not hashed, so names stay the same.
    assert _name(PriorConfig()) == "prior-b5506f8d7a3e"  # the name before the key existed
    assert "text_tokens" not in PriorConfig().identity()
    assert _name(PriorConfig(text_tokens=False)) == _name(PriorConfig())
    assert PriorConfig(text_tokens=True).identity()["text_tokens"] is True
    assert _name(PriorConfig(text_tokens=True)) != _name(PriorConfig())


def test_vision_tower_names_a_new_clip_run_only_when_set(tmp_path):
    from unclip.datasets.config import ClipConfig
    from unclip.datasets.storage import StorageLayout
    from unclip.training.config import BootstrapClipConfig
    from unclip.training.models.bootstrap_clip import ClipTask
    from unclip.training.models.run_names import bootstrap_clip_run_name

    def name(clip):
        return bootstrap_clip_run_name(clip, BootstrapClipConfig(), 0.05, ["abc"])

    # Added after CLIP runs were named and checkpointed: at its default, names and the task's
    # record (which a resumed checkpoint must match) are what they were before the key existed.
    assert name(ClipConfig()) == "clip-a11c9b8f8348"
    assert name(ClipConfig(vision_tower="vit")) == name(ClipConfig())
    assert name(ClipConfig(vision_tower="resnet")) != name(ClipConfig())

    def recorded(clip):
        task = ClipTask(StorageLayout(str(tmp_path)), clip, ["abc"], 0.05)
        return task.describe()["clip"]

    assert "vision_tower" not in recorded(ClipConfig())
    assert recorded(ClipConfig(vision_tower="resnet"))["vision_tower"] == "resnet"
