import glob
import os

import pytest
import yaml

from utils.config import Config, ConfigError, diff_configs, from_dict, load_config, to_dict, to_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_defaults_are_the_demo():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.name == "hmsa_deeplabv3plus"
    assert cfg.eval.scales == (0.5, 1.0, 2.0)


def test_overrides_parse_as_yaml():
    cfg = load_config(None, ["train.lr=5e-3", "eval.scales=[0.25,0.5,1.0,2.0]", "data.augment.crop_size=[64,96]",
                             "eval.flip=true", "model.options.trunk=resnet50"])
    assert cfg.train.lr == 5e-3 and isinstance(cfg.train.lr, float)
    assert cfg.eval.scales == (0.25, 0.5, 1.0, 2.0)
    assert cfg.data.augment.crop_size == (64, 96)
    assert cfg.eval.flip is True
    # an override edits the options in place, keeping the other defaults
    assert cfg.model.options["trunk"] == "resnet50" and cfg.model.options["aspp_ch"] == 64


def test_int_accepted_for_float():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'.*did you mean 'train\.lr'"):
        load_config(None, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"did you mean 'eval'"):
        load_config(None, ["evl.flip=true"])


def test_wrong_type_names_key_expected_and_given():
    with pytest.raises(ConfigError, match=r"train\.max_iter: expected int, got str 'many'"):
        load_config(None, ["train.max_iter=many"])
    with pytest.raises(ConfigError, match=r"eval\.flip: expected bool, got int"):
        load_config(None, ["eval.flip=3"])
    with pytest.raises(ConfigError, match=r"data\.augment\.crop_size: expected 2 values, got 3"):
        load_config(None, ["data.augment.crop_size=[1,2,3]"])
    with pytest.raises(ConfigError, match=r"run\.precision: expected one of"):
        load_config(None, ["run.precision=fp8"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.lr"])


def test_yaml_base_and_options_replacement(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  lr: 0.02\nmodel:\n  options: {trunk: resnet50}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  max_iter: 7\n")
    cfg = load_config(str(tmp_path / "child.yaml"), ["train.seed=3"])
    assert (cfg.train.lr, cfg.train.max_iter, cfg.train.seed) == (0.02, 7, 3)
    # a recipe's options replace the demo's narrow widths as a whole
    assert cfg.model.options == {"trunk": "resnet50"}
    (tmp_path / "grandchild.yaml").write_text("base: child.yaml\n")
    with pytest.raises(ConfigError, match="only one level"):
        load_config(str(tmp_path / "grandchild.yaml"))


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(bad))


def test_round_trip_and_diff():
    cfg = load_config(None, ["train.lr=0.5", "eval.scales=[1.0]"])
    again = from_dict(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg
    assert diff_configs(cfg, cfg) == []
    assert diff_configs(cfg, load_config()) == ["eval.scales: [1.0] -> [0.5, 1.0, 2.0]", "train.lr: 0.5 -> 0.01"]


def test_config_is_immutable():
    cfg = load_config()
    with pytest.raises(AttributeError):
        cfg.train.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)))
def test_every_recipe_loads(path):
    cfg = load_config(path)
    assert to_dict(cfg)["model"]["name"]


@pytest.mark.parametrize("scales,match", [("[0.5,2.0]", "must contain 1.0"), ("[0.0,1.0]", "must be positive")])
def test_scale_list_checked_at_load(scales, match):
    with pytest.raises(ConfigError, match=rf"eval\.scales: .*{match}"):
        load_config(None, [f"eval.scales={scales}"])


def test_budget_must_be_positive():
    with pytest.raises(ConfigError, match="train.max_iter or train.max_epoch"):
        load_config(None, ["train.max_iter=0", "train.max_epoch=0"])


@pytest.mark.parametrize("override,match", [("train.accum_steps=0", "accum_steps must be at least 1"),
                                            ("run.dist_timeout=0", "dist_timeout must be a positive")])
def test_train_settings_checked_at_load(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize("override,match", [
    ("eval.fusion=mean", r"eval\.fusion: expected one of"),
    ("eval.dump=some", r"eval\.dump: expected one of"),
    ("eval.scale_sets=[[1.0],[0.5,2.0]]", r"eval\.scale_sets\[1\]: .*must contain 1.0"),
    ("eval.sweep_fusions=[attention,median]", r"eval\.sweep_fusions\[1\]: .*median"),
])
def test_eval_settings_checked_at_load(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_diff_against_a_checkpoint_of_an_older_schema():
    # A checkpoint's config dict with a key this version removed and without a key it added: resume compares
    # only what this version reads, the missing key at its default.
    saved = to_dict(load_config(overrides=["train.lr=0.5"]))
    saved["data"]["generate"] = True
    del saved["train"]["val_epochs"]
    assert diff_configs(saved, load_config()) == ["train.lr: 0.5 -> 0.01"]
    saved["model"]["options"]["old_option"] = 1  # model options are compared both ways: the factory reads them
    assert "model.options.old_option: 1 -> None" in diff_configs(saved, load_config())


# ----------------------------------------------------------------------------------------------- old key names


def test_old_key_names_work_and_warn(tmp_path, caplog):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("data:\n  gblur: false\n  custom_coarse_prob: 0.5\n  pre_size: 2177\ntrain:\n  run_name: x\n")
    with caplog.at_level("WARNING", logger="utils.config"):
        cfg = load_config(str(recipe), ["train.precision=bf16", "data.class_uniform_pct=0.5"])
    assert (cfg.data.augment.gaussian_blur, cfg.data.coarse.autolabel_threshold, cfg.data.augment.long_edge) == (
        False, 0.5, 2177)
    assert (cfg.run.name, cfg.run.precision, cfg.data.class_uniform.pct) == ("x", "bf16", 0.5)
    warned = caplog.text
    for old, new in [("data.gblur", "data.augment.gaussian_blur"), ("train.run_name", "run.name"),
                     ("train.precision", "run.precision"), ("data.class_uniform_pct", "data.class_uniform.pct")]:
        assert f"'{old}' is now '{new}'" in warned
    assert str(recipe) in warned  # the file that uses the old name is named


def test_old_and_new_name_together_is_an_error(tmp_path):
    recipe = tmp_path / "both.yaml"
    recipe.write_text("data:\n  gblur: false\n  augment:\n    gaussian_blur: true\n")
    with pytest.raises(ConfigError, match=r"'data\.gblur' and 'data\.augment\.gaussian_blur' are the same key"):
        load_config(str(recipe))


def test_old_names_in_a_base_recipe_merge_with_new_names_in_the_child(tmp_path):
    (tmp_path / "base.yaml").write_text("data:\n  crop_size: [64, 64]\n  gblur: false\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ndata:\n  augment:\n    crop_size: [32, 32]\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert cfg.data.augment.crop_size == (32, 32) and cfg.data.augment.gaussian_blur is False


def test_a_checkpoint_config_with_old_names_is_not_a_difference():
    new = load_config(None, ["run.precision=bf16", "data.augment.crop_size=[64,64]"])
    saved = to_dict(new)
    saved["train"]["precision"] = saved["run"].pop("precision")  # as an earlier version stored it
    saved["data"]["crop_size"] = saved["data"]["augment"].pop("crop_size")
    assert diff_configs(saved, new) == []
    assert diff_configs(saved, load_config(None, ["data.augment.crop_size=[64,64]"])) == [
        "run.precision: 'bf16' -> 'fp32'"]


def test_every_alias_points_at_a_schema_key():
    from utils.config import ALIASES, choices

    for old, new in ALIASES.items():
        node = to_dict(Config())
        for part in new.split("."):
            assert part in node, f"{old} -> {new}: no such key"
            node = node[part]
    assert choices("run.precision") == ("fp32", "bf16", "fp16") and choices("train.lr") == ()
