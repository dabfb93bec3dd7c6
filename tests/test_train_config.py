"""Config: YAML gives the defaults, the command line overrides them, the resolved config reloads."""

import pytest
import yaml

from train import config


def test_shipped_configs_load():
    names = sorted(p.stem for p in config.CONFIG_DIR.glob("*.yaml"))
    assert {
        "mnist_lt_acl",
        "imagenet_lt_r50",
        "imagenet_lt_x50",
        "inat2018_r50",
        "places_lt_r152",
        "cifar100_lt_r32",
        "cifar10_lt_r32",
    } <= set(names)
    for name in names:
        cfg = config.resolve(["--config", name])
        assert cfg["name"] == name
        assert cfg["loss"] in config.CHOICES["loss"]


def test_recipe_values_come_from_yaml():
    cfg = config.resolve(["--config", "imagenet_lt_x50"])
    assert (cfg["arch"], cfg["lr"], cfg["alpha"], cfg["randaug_n"], cfg["num_classes"]) == (
        "resnext50_32x4d",
        0.06,
        0.05,
        3,
        1000,
    )
    cfg = config.resolve(["--config", "cifar100_lt_r32"])
    assert (cfg["schedule"], cfg["lr_steps"], cfg["imbalance"], cfg["proj_dim"]) == ("step", [320, 360], 100, 32)
    assert config.resolve(["-c", "places_lt_r152"])["pretrained"].endswith(".pth")


def test_default_config_is_the_embedded_mnist_lt():
    cfg = config.resolve([])
    assert cfg["dataset"] == "mnist_lt" and cfg["loss"] == "acl" and cfg["name"] == "mnist_lt_acl"


def test_cli_overrides_yaml(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("loss: paco\nlr: 0.5\nviews: [simclr]\ncompile: true\n")
    cfg = config.resolve(
        [
            "--config",
            str(f),
            "--lr",
            "0.25",
            "--data-loader",
            "pytorch",
            "--batch_size",
            "64",
            "--views",
            "randaug,simclr",
            "--compile",
            "false",
            "--lr-steps",
            "[5, 7]",
        ]
    )
    assert cfg["loss"] == "paco"  # from YAML
    assert cfg["lr"] == 0.25 and cfg["batch_size"] == 64 and cfg["data_loader"] == "pytorch"
    assert cfg["views"] == ["randaug", "simclr"] and cfg["compile"] is False and cfg["lr_steps"] == [5, 7]
    assert cfg["epochs"] == config.DEFAULTS["epochs"]  # untouched default
    assert cfg["name"] == "mine"


def test_resolved_config_round_trips(tmp_path):
    cfg = config.resolve(["--lr", "0.3", "--loss", "gpaco"])
    path = tmp_path / "config.yaml"
    config.save(cfg, path)
    again = config.resolve(["--config", str(path)])
    assert {k: again[k] for k in config.DEFAULTS} == {k: cfg[k] for k in config.DEFAULTS}


def test_bad_configs_fail_early(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("learning_rate: 0.1\n")
    with pytest.raises(config.ConfigError, match="unknown keys"):
        config.resolve(["--config", str(f)])
    with pytest.raises(config.ConfigError, match="not found"):
        config.resolve(["--config", "no_such_config"])
    f.write_text(yaml.safe_dump({"loss": "focal"}))
    with pytest.raises(config.ConfigError, match="loss"):
        config.resolve(["--config", str(f)])
    with pytest.raises(SystemExit):
        config.resolve(["--loss", "focal"])
    with pytest.raises(config.ConfigError, match="n_views"):
        config.resolve(["--loss", "paco", "--n-views", "1"])
