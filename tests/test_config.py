"""wtours.config: defaults <- YAML (with base:) <- dotted overrides, validated with one-line errors."""

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from wtours.config import from_dict, load_config, parse_overrides, to_dict, to_yaml
from wtours.errors import ConfigError


@dataclass
class Optim:
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10


@dataclass
class Cfg:
    name: str = "run"
    steps: int = 100
    compat: bool = False
    mode: Literal["batch", "sample"] = "batch"
    videos: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    optim: Optim = field(default_factory=Optim)

    def validate(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"steps: must be positive, got {self.steps}")


def test_defaults_yaml_and_overrides_layer_in_order(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("steps: 5\noptim:\n  lr: 0.1\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\noptim:\n  warmup_steps: 3\n")
    cfg = load_config(Cfg, child, ["optim.lr=2e-3", "videos=[a.mp4, b.mp4]", "mode=sample", "seed=7"])
    assert cfg.steps == 5
    assert cfg.optim.lr == pytest.approx(2e-3)
    assert cfg.optim.warmup_steps == 3
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.videos == ["a.mp4", "b.mp4"]
    assert cfg.mode == "sample" and cfg.seed == 7


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(Cfg, None, ["optim.betas=[0.8, 0.9]", "compat=true"])
    p = tmp_path / "resolved.yaml"
    p.write_text(to_yaml(cfg))
    again = load_config(Cfg, p)
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["optim.lrr=1"], "unknown config key 'optim.lrr'; valid keys here: betas, lr, warmup_steps"),
        (["stepz=1"], "unknown config key 'stepz'"),
        (["steps=abc"], "steps: expected an integer"),
        (["compat=maybe"], "compat: expected true or false"),
        (["mode=pixel"], "mode: 'pixel' is not one of 'batch', 'sample'"),
        (["optim.betas=[1, 2, 3]"], "optim.betas: expected 2 values, got 3"),
        (["steps=-1"], "steps: must be positive"),
        (["optim=3"], "optim"),
        (["novalue"], "expected key=value"),
    ],
)
def test_bad_keys_and_values_raise_one_line_config_errors(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, None, overrides)
    msg = str(e.value)
    assert fragment in msg
    assert "\n" not in msg


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(Cfg, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML \(line"):
        load_config(Cfg, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Cfg, lst)


def test_parse_overrides_builds_a_tree():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}


def test_int_is_accepted_for_float_and_integral_float_for_int():
    cfg = from_dict(Cfg, {"optim": {"lr": 1}, "steps": 10.0})
    assert isinstance(cfg.optim.lr, float) and cfg.steps == 10 and isinstance(cfg.steps, int)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "'inf'"])
def test_float_fields_reject_non_finite_numbers(value):
    # nan passes every `<= 0` check, so it has to be refused where the number is read
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, None, [f"optim.lr={value}"])
    assert str(e.value).startswith("optim.lr: must be a finite number, got ")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.lr=.nan", "optim.lr: must be a finite number, got nan"),
        ("loss.teacher_temp=.nan", "loss.teacher_temp: must be a finite number"),
        ("data.prefetch_factor=0", "data.prefetch_factor: must be >= 1, got 0"),
        ("model.arch=resnet18", "model.arch: 'resnet18' is a ResNet, not a ViT"),
        ("model.arch=vit_nonsense_patch16", "model.arch: unknown or unsupported timm architecture 'vit_nonsense_"),
    ],
)
def test_pretrain_config_values_checked_at_load(override, fragment):
    from wtours.stages.video.config import VideoPretrainConfig

    with pytest.raises(ConfigError) as e:
        load_config(VideoPretrainConfig, "video/tiny", [override])
    assert fragment in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- stage-1 cross-section checks


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["crops.local_number=0"], "crops.local_number: DoRA needs at least 1 local crop, got 0"),
        (["loss.compat_reference=true", "crops.local_number=1"],
         "crops.local_number: loss.compat_reference needs at least 2 local crops"),
        (["model.arch=vit_nano_patch8_64", "crops.global_size=60"],
         "crops.global_size: 60 is not a multiple of the patch size 8 of 'vit_nano_patch8_64'"),
        (["model.arch=vit_nano_patch8_64", "crops.local_size=20"],
         "crops.local_size: 20 is not a multiple of the patch size 8 of 'vit_nano_patch8_64'"),
        (["model.arch=vit_tiny_patch16_224", "crops.global_size=40"],
         "crops.global_size: 40 is not a multiple of the patch size 16 of 'vit_tiny_patch16_224'"),
        (["model.arch=vit_tiny_patch16_224", "tracking.objects=4"],
         "tracking.objects: 4 objects need as many attention heads, 'vit_tiny_patch16_224' has 3"),
    ],
)
def test_pretrain_cross_section_checks_happen_at_load(overrides, message):
    """Every stage-1 check runs in the config's validate(), i.e. in load_config / from_dict: one line naming the key."""
    from wtours.stages.video.config import VideoPretrainConfig

    with pytest.raises(ConfigError) as e:
        load_config(VideoPretrainConfig, "video/tiny", overrides)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    data = parse_overrides(overrides)
    with pytest.raises(ConfigError, match="^" + message.split(":")[0]):  # from_dict validates the root as well
        from_dict(VideoPretrainConfig, data)


def test_patch_size_comes_from_the_model_not_its_name():
    from wtours.models.weights import vit_geometry
    from wtours.stages.video.config import VideoPretrainConfig

    assert vit_geometry("vit_nano_patch8_64") == (8, 4, 128, 6)
    assert vit_geometry("vit_tiny_patch16_224") == (16, 3, 192, 12)
    # a patch-8 ViT takes sizes that are multiples of 8 (not of 16)
    cfg = load_config(VideoPretrainConfig, "video/tiny",
                      ["model.arch=vit_nano_patch8_64", "crops.global_size=56", "crops.local_size=24"])
    assert cfg.crops.global_size == 56


def test_a_written_config_reloads_with_the_same_training_hash(tmp_path):
    # float fields with integer defaults (trainer.epochs = 100) must not hash as 100 here and 100.0 after YAML
    from wtours.config import to_yaml
    from wtours.stages.video.run import load_pretrain_config
    from wtours.stages.video.config import training_hash

    for name in ("video/tiny", "video/dora_vits16", "video/timet_tiny"):
        cfg = load_pretrain_config(name, [])
        (tmp_path / "config.yaml").write_text(to_yaml(cfg))
        again = load_pretrain_config(str(tmp_path / "config.yaml"), [])
        assert training_hash(again) == training_hash(cfg), name
        assert isinstance(cfg.trainer.epochs, float)
