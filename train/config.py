"""Configuration: built-in defaults <- YAML file <- command line, as timm's train.py.

Every key of `DEFAULTS` is a command-line option (`--batch-size 64` or `--batch_size 64`); a YAML
config may only set known keys, so a typo fails before anything runs. The resolved config is
written as `config.yaml` beside the checkpoints.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = "mnist_lt_acl"

DEFAULTS: dict[str, Any] = {
    # data
    "dataset": "mnist_lt",  # mnist_lt | cifar10_lt | cifar100_lt | split (ImageNet-LT, iNaturalist, Places-LT)
    "data_root": "",  # folder the paths of the split files are relative to (CIFAR: folder of the CIFAR copy)
    "train_split": "",  # "relative/path label" lines; relative to data_root unless absolute
    "val_split": "",
    "test_split": "",
    "num_classes": 0,  # 0: max label + 1 of the training split
    "imbalance": 100,  # rho of the CIFAR-LT / MNIST-LT exponential profile
    "cache_dir": ".cache/acl-train",  # where MNIST-LT / CIFAR-LT are written on first use
    "data_loader": "dali",  # dali | pytorch
    "workers": 2,  # DALI threads / DataLoader workers per rank
    "prefetch": 2,  # batches prepared ahead per rank (DALI queue depth, DataLoader prefetch per worker)
    "image_size": 224,
    "eval_resize": 256,  # shorter side before the centre crop at evaluation
    "views": ["randaug", "simclr"],  # augmentation recipe of each view, cycled to n_views
    "n_views": 2,
    "randaug_n": 2,
    "randaug_m": 10,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    # model
    "arch": "resnet50",  # resnet50 | resnext50_32x4d | resnet152 | resnet32 | small_cnn | tiny_cnn
    "pretrained": "",  # local checkpoint of the backbone (torchvision state_dict); nothing is downloaded
    "head": "mlp_bn",  # mlp_bn (PaCo) | mlp3 (GPaCo)
    "proj_dim": 128,
    "sync_bn": False,
    "freeze": "",
    # loss
    "loss": "acl",  # acl | paco | gpaco | supcon | ce | la
    "alpha": 0.05,
    "beta": 1.0,
    "gamma": 1.0,
    "supt": 1.0,
    "temperature": 0.2,
    "smooth": 0.0,  # label smoothing of the centre target (gpaco)
    "negative_weight": "batch",  # acl: none | batch | prior
    "kappa": 1.0,
    "logit_adjust": True,  # add log(class prior) to the centre logits while training
    "queue_size": 0,  # K: MoCo-style queue of detached keys (paco, gpaco, acl)
    "moco_momentum": 0.999,  # paco key encoder
    "la_tau": 1.0,  # la: logits + tau * log(prior)
    "supcon_weight": 1.0,  # supcon: CE + weight * SupCon
    "loss_impl": "auto",
    # optimisation
    "epochs": 400,
    "batch_size": 128,  # global batch, split evenly across ranks
    "lr": 0.02,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "warmup_epochs": 10,
    "schedule": "cosine",  # cosine | step
    "lr_steps": [320, 360],  # step schedule: x0.1 at each
    "amp": "auto",  # auto (bf16 on GPU, off on CPU) | bf16 | fp16 | none
    "channels_last": "auto",  # auto (on GPU) | true | false
    "compile": False,
    # fp32 matmuls (the backbone under AMP off, and the fused loss: projections reach it in fp32) on
    # tensor cores with tf32, as timm does; the loss's tolerance with tf32 is in docs/losses.md
    "tf32": True,
    # run
    "output": "runs",
    "name": "",  # run folder under output; default: the config's name
    "seed": 0,
    "device": "auto",  # auto | cpu | cuda
    "threads": 0,  # torch intra-op threads on CPU; 0: torch's default
    "resume": "",  # checkpoint path, or "auto": <run folder>/checkpoint.pt if it exists
    "stop_at_epoch": 0,  # end the run after this epoch as if interrupted (split a long run into jobs); 0: never
    "stop_check_every": 20,  # DDP: ranks agree on a SIGTERM every this many steps
    "max_steps": 0,  # stop each epoch after this many steps (smoke tests); 0: full epochs
    "max_eval_batches": 0,
    "eval_every": 1,
    "progress": True,
    "tensorboard": True,
    "plot": True,
}

CHOICES = {
    "dataset": ("mnist_lt", "cifar10_lt", "cifar100_lt", "split"),
    "data_loader": ("dali", "pytorch"),
    "arch": ("resnet50", "resnext50_32x4d", "resnet152", "resnet32", "small_cnn", "tiny_cnn"),
    "head": ("mlp_bn", "mlp3"),
    "loss": ("acl", "paco", "gpaco", "supcon", "ce", "la"),
    "negative_weight": ("none", "batch", "prior"),
    "freeze": ("", "all_but_last_block"),
    "schedule": ("cosine", "step"),
    "amp": ("auto", "bf16", "fp16", "none"),
    "device": ("auto", "cpu", "cuda"),
}


# help text of the options (the others explain themselves through the comments above)
HELP = {
    "prefetch": "batches each rank's loader prepares ahead of the step: DALI's prefetch queue depth, "
    "or the DataLoader's prefetch_factor (per worker)",
    "stop_check_every": "under DDP, the ranks agree whether a SIGTERM arrived (one small CPU all-reduce) every "
    "this many steps and at each epoch's last step, and all stop there; one process checks after every step",
    "val_split": "split file of the validation set: it selects the epoch whose weights are kept (best.pt)",
    "test_split": "split file of the held-out test set, evaluated once with the selected weights; "
    "MNIST-LT has its own (val.txt / test.txt)",
    "freeze": "'' (train everything) or 'all_but_last_block': the convolutions of a ResNet outside its last "
    "residual block keep their (pretrained) weights, as the official Places-LT recipe",
}


class ConfigError(ValueError):
    pass


def find_config(name: str) -> Path:
    """A path, or the name of a shipped config (`imagenet_lt_r50` = train/configs/imagenet_lt_r50.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / (name if name.endswith((".yaml", ".yml")) else name + ".yaml")
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name!r} not found (neither a file nor one of the shipped configs: {names})")


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of keys to values")
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"config {path}: unknown keys {unknown}")
    return data


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_list(text: str) -> list:
    value = yaml.safe_load(text) if text.strip().startswith("[") else [yaml.safe_load(t) for t in text.split(",")]
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"expected a list such as a,b or [a, b], got {text!r}")
    return value


def _arg_type(default: Any):
    if isinstance(default, bool):
        return _parse_bool
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    if isinstance(default, list):
        return _parse_list
    return str


def build_parser(defaults: dict[str, Any]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acl-train",
        description="Train a long-tailed classifier with ACL / PaCo / GPaCo / SupCon / CE / LA.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--config",
        "-c",
        default=DEFAULT_CONFIG,
        help="YAML file or shipped config name; its keys are the defaults of the options below",
    )
    for key, default in defaults.items():
        kwargs: dict[str, Any] = {"default": default, "type": _arg_type(DEFAULTS[key]), "dest": key}
        if key in CHOICES:
            kwargs["choices"] = CHOICES[key]
        if key in HELP:
            kwargs["help"] = HELP[key]
        if isinstance(DEFAULTS[key], bool):
            kwargs["metavar"] = "BOOL"
        flags = {"--" + key, "--" + key.replace("_", "-")}
        parser.add_argument(*sorted(flags), **kwargs)
    return parser


def resolve(argv: list[str] | None = None) -> dict[str, Any]:
    """Defaults <- YAML (--config) <- command line. Returns the flat config dict (plus `config`)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", "-c", default=DEFAULT_CONFIG)
    known, _ = pre.parse_known_args(argv)
    path = find_config(known.config)
    defaults = {**DEFAULTS, **load_yaml(path)}
    for key in CHOICES:
        if defaults[key] not in CHOICES[key]:
            raise ConfigError(f"config {path}: {key}={defaults[key]!r} is not one of {CHOICES[key]}")
    cfg = vars(build_parser(defaults).parse_args(argv))
    cfg["config"] = str(path)
    if not cfg["name"]:
        cfg["name"] = path.stem
    check(cfg)
    return cfg


def check(cfg: dict[str, Any]) -> None:
    if cfg["n_views"] < 1:
        raise ConfigError(f"n_views must be >= 1, got {cfg['n_views']}")
    if cfg["loss"] in ("paco", "supcon", "gpaco") and cfg["n_views"] < 2:
        raise ConfigError(f"loss={cfg['loss']} needs n_views >= 2, got {cfg['n_views']}")
    if not 0 <= cfg["randaug_m"] <= 10:
        raise ConfigError(f"randaug_m must be in [0, 10] (timm's RandAugment magnitude scale), got {cfg['randaug_m']}")
    if not cfg["views"]:
        raise ConfigError("views must list at least one augmentation recipe")
    for key in ("stop_check_every", "prefetch"):
        if cfg[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {cfg[key]}")
    if cfg["batch_size"] < 1 or cfg["epochs"] < 1:
        raise ConfigError("batch_size and epochs must be >= 1")
    if cfg["dataset"] == "split" and not (cfg["train_split"] and cfg["val_split"]):
        raise ConfigError("dataset=split needs train_split and val_split")


def run_dir(cfg: dict[str, Any]) -> Path:
    return Path(cfg["output"]) / cfg["name"]


def save(cfg: dict[str, Any], path: Path) -> None:
    """Write the resolved config atomically; it loads back with `--config <path>`."""
    data = {k: cfg[k] for k in DEFAULTS}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(f"# resolved config of this run (from {cfg['config']})\n" + yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)
