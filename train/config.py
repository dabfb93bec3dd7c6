"""Configuration: built-in defaults <- YAML file <- command line, as timm's train.py.

Every key of `DEFAULTS` is a command-line option (`--batch-size 64` or `--batch_size 64`); a YAML
config may only set known keys, so a typo fails before anything runs. The resolved config is
written as `config.yaml` beside the checkpoints.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import yaml

from .data import RECIPES

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
    "acl_mode": "aligned",  # acl: aligned (a denominator per positive) | softmax (one shared, as SupCon)
    "acl_centres": True,  # acl: class centres in the loss; false: samples only, plus a logit-adjusted CE
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
    "name": "",  # run folder under output; default: the config's name (+ the loss if changed)
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
    "check_images": True,  # decode every image once before training (cached by a stamp)
}

CHOICES = {
    "dataset": ("mnist_lt", "cifar10_lt", "cifar100_lt", "split"),
    "data_loader": ("dali", "pytorch"),
    "arch": ("resnet50", "resnext50_32x4d", "resnet152", "resnet32", "small_cnn", "tiny_cnn"),
    "head": ("mlp_bn", "mlp3"),
    "loss": ("acl", "paco", "gpaco", "supcon", "ce", "la"),
    "negative_weight": ("none", "batch", "prior"),
    "acl_mode": ("aligned", "softmax"),
    "freeze": ("", "all_but_last_block"),
    "schedule": ("cosine", "step"),
    "amp": ("auto", "bf16", "fp16", "none"),
    "device": ("auto", "cpu", "cuda"),
}


# help text of the options (`--help` adds each default); every option has one
HELP = {
    "dataset": "mnist_lt / cifar10_lt / cifar100_lt (built once into cache_dir) or split (split files)",
    "data_root": "folder the image paths of the split files are relative to (CIFAR: the local CIFAR copy); "
    "paths may not leave it",
    "train_split": "training split file, '<relative/path> <label>' per line; relative to data_root",
    "num_classes": "number of classes; 0 infers max label + 1 of the training split (and reports empty classes); "
    "a label >= a set value is refused",
    "imbalance": "rho of the CIFAR-LT / MNIST-LT exponential profile (largest / smallest class)",
    "cache_dir": "where MNIST-LT / CIFAR-LT are written on first use, and the image-check stamps",
    "data_loader": "dali (DALI pipeline) or pytorch (torchvision fallback, the same batches)",
    "workers": "DALI threads / DataLoader workers per rank (also the threads of the image check)",
    "image_size": "side of the square training / evaluation crops",
    "eval_resize": "shorter side before the evaluation centre crop (>= image_size)",
    "views": "augmentation recipe of each view, cycled to n_views: " + ", ".join(RECIPES),
    "n_views": "augmented views per image (>= 2 for paco, gpaco, supcon)",
    "randaug_n": "RandAugment: operations per image",
    "randaug_m": "RandAugment: magnitude (0-10, timm's scale)",
    "mean": "per-channel normalisation mean (RGB, 0-1 scale)",
    "std": "per-channel normalisation standard deviation",
    "arch": "backbone",
    "pretrained": "local torchvision state_dict of the backbone (nothing is downloaded)",
    "head": "projection head: mlp_bn (PaCo) or mlp3 (GPaCo)",
    "proj_dim": "projection (contrastive feature) dimension",
    "sync_bn": "synchronise BatchNorm statistics across ranks",
    "loss": "training objective: acl, paco, gpaco, supcon (CE + SupCon), ce, la (logit adjustment)",
    "alpha": "weight of the sample positives in the contrastive target",
    "beta": "weight of the own class centre in the contrastive target",
    "gamma": "weight of the sample block in the denominator",
    "supt": "temperature of the class-centre logits",
    "temperature": "contrastive temperature (finite, > 0)",
    "smooth": "label smoothing of the centre target (gpaco), in [0, 1)",
    "negative_weight": "acl: weighting of the negatives (none, batch = 1 / class count, prior = pi^-kappa)",
    "kappa": "exponent of negative_weight=prior",
    "acl_mode": "acl: aligned (every positive its own denominator of itself and the negatives) or softmax "
    "(one denominator shared by all positives, as SupCon; for ablations)",
    "acl_centres": "acl: class centres (the classifier's rows) in the loss; false: the loss over samples only, "
    "plus a logit-adjusted cross-entropy that trains the classifier (for ablations)",
    "logit_adjust": "add log(class prior) to the centre logits while training",
    "queue_size": "K: queue of detached keys from earlier batches (paco, gpaco, acl); 0: none",
    "moco_momentum": "momentum of the paco key encoder",
    "la_tau": "la: logits + tau * log(prior)",
    "supcon_weight": "supcon: CE + weight * SupCon",
    "loss_impl": "loss backend: auto, triton, native, torch or reference",
    "epochs": "training epochs (may change on resume)",
    "batch_size": "global batch, split evenly across ranks",
    "lr": "peak learning rate of SGD",
    "momentum": "SGD momentum",
    "weight_decay": "SGD weight decay",
    "warmup_epochs": "linear warm-up epochs (per step)",
    "schedule": "cosine to 0, or step (x0.1 at each of lr_steps)",
    "lr_steps": "epochs of the step schedule's x0.1 drops",
    "amp": "mixed precision: auto (bf16 on GPU, off on CPU), bf16, fp16 or none",
    "channels_last": "channels-last memory format: auto (on GPU), true or false",
    "compile": "torch.compile the model",
    "tf32": "tensor-core tf32 for fp32 matrix products on GPU",
    "output": "folder of the runs",
    "name": "run folder under output; default: the config's name, plus the loss when --loss changes it "
    "(mnist_lt_acl-supcon); an existing run folder is continued only with --resume",
    "seed": "seed of the weights, the sample order and the augmentations",
    "device": "auto, cpu or cuda",
    "threads": "torch intra-op threads on CPU; 0: torch's default",
    "resume": "checkpoint to resume from, or auto (<run folder>/checkpoint.pt if it exists); the config "
    "must match the checkpoint's except for logging options and epochs",
    "stop_at_epoch": "end the run after this epoch as if interrupted (split a long run into jobs); 0: never",
    "max_steps": "stop each epoch after this many steps (smoke tests); 0: full epochs",
    "max_eval_batches": "evaluate on at most this many batches; 0: all",
    "eval_every": "evaluate every this many epochs (and after the last)",
    "progress": "show a progress bar (per-step TensorBoard scalars are written either way)",
    "tensorboard": "write TensorBoard logs to <run folder>/tb",
    "plot": "write curves.png at the end",
    "check_images": "decode every image once before training and stop naming the undecodable ones; "
    "a stamp in cache_dir makes later runs on the same files skip it",
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
        epilog="Several processes on this machine: --nproc-per-node N [--max-restarts R] starts N of them "
        "under torchrun; with --resume auto, workers restarted after one is lost continue from the last checkpoint.",
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
        if key in HELP:
            kwargs["help"] = HELP[key]
        if key in CHOICES:
            kwargs["choices"] = CHOICES[key]
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
        cfg["name"] = default_name(path, cfg, defaults)
    check(cfg)
    return cfg


def default_name(path: Path, cfg: dict[str, Any], defaults: dict[str, Any]) -> str:
    """The config's name, plus the loss when the command line changed it (mnist_lt_acl-supcon)."""
    return path.stem if cfg["loss"] == defaults["loss"] else f"{path.stem}-{cfg['loss']}"


# (key, lowest, highest, lowest included) of the numeric options; None: no bound
RANGES = (
    *[(k, 0, None, True) for k in ("num_classes", "workers", "queue_size", "threads", "max_steps", "randaug_n")],
    *[(k, 0, None, True) for k in ("max_eval_batches", "stop_at_epoch", "warmup_epochs", "weight_decay", "seed")],
    *[(k, 1, None, True) for k in ("image_size", "eval_resize", "proj_dim", "eval_every", "imbalance")],
    *[(k, 1, None, True) for k in ("batch_size", "epochs", "stop_check_every", "prefetch", "n_views")],
    ("lr", 0, None, False),
    ("momentum", 0, 1, True),
    ("moco_momentum", 0, 1, True),
    ("randaug_m", 0, 10, True),  # timm's RandAugment magnitude scale
    ("supcon_weight", 0, None, True),
)


def _check_types(cfg: dict[str, Any]) -> None:
    """Each value has its default's type (a YAML file can hold anything); floats accept ints."""
    for key, default in DEFAULTS.items():
        v = cfg[key]
        if key == "channels_last":
            ok = v in ("auto", "true", "false", True, False)
        elif isinstance(default, bool):
            ok = isinstance(v, bool)
        elif isinstance(default, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif isinstance(default, float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        else:
            ok = isinstance(v, type(default))
        if not ok:
            raise ConfigError(f"{key} must be like its default {default!r} ({type(default).__name__}), got {v!r}")


def check(cfg: dict[str, Any]) -> None:
    """Every value checked when the config is read, before any data or model set-up."""
    _check_types(cfg)
    for key, lo, hi, closed in RANGES:
        v = cfg[key]
        if (v < lo if closed else v <= lo) or (hi is not None and v > hi):
            bound = f"{'>=' if closed else '>'} {lo}" + (f" and <= {hi}" if hi is not None else "")
            raise ConfigError(f"{key} must be {bound}, got {v!r}")
    unknown = [r for r in cfg["views"] if r not in RECIPES]
    if unknown:
        raise ConfigError(f"views: unknown augmentation recipe(s) {unknown}; known: {list(RECIPES)}")
    name = Path(cfg["name"])
    if name.is_absolute() or ".." in name.parts:
        raise ConfigError(f"name must be a folder name under output (not absolute, no '..'), got {cfg['name']!r}")
    if cfg["eval_resize"] < cfg["image_size"]:
        raise ConfigError(
            f"eval_resize must be >= image_size (the evaluation's centre crop of image_size is cut from the image "
            f"resized to eval_resize), got eval_resize={cfg['eval_resize']}, image_size={cfg['image_size']}"
        )
    if len(cfg["mean"]) != 3 or len(cfg["std"]) != 3 or not all(s > 0 for s in cfg["std"]):
        raise ConfigError(f"mean and std need 3 values (RGB), std > 0; got {cfg['mean']}, {cfg['std']}")
    try:
        from acl_kernels.functional import check_settings

        check_settings(
            temperature=cfg["temperature"],
            alpha=cfg["alpha"],
            beta=cfg["beta"],
            gamma=cfg["gamma"],
            supt=cfg["supt"],
            smooth=cfg["smooth"],
            negative_weight=cfg["negative_weight"],
            kappa=cfg["kappa"],
            impl=cfg["loss_impl"],
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(f"loss setting: {e}") from e
    if cfg["loss"] in ("paco", "supcon", "gpaco") and cfg["n_views"] < 2:
        raise ConfigError(f"loss={cfg['loss']} needs n_views >= 2, got {cfg['n_views']}")
    if not cfg["views"]:
        raise ConfigError("views must list at least one augmentation recipe")
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
