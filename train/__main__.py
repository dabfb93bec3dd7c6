"""`python -m train --config train/configs/<name>.yaml [--key value ...]` (console script `acl-train`)."""

from __future__ import annotations

import os
import sys

from .checkpoint import CheckpointError
from .config import ConfigError, resolve
from .datasets import DataError
from .engine import train
from .launch import exec_torchrun, torchrun_command
from .stop import TrainingError


def main(argv: list[str] | None = None) -> int:
    command = torchrun_command(sys.argv[1:] if argv is None else argv)
    if command is not None:
        exec_torchrun(command)
    try:
        cfg = resolve(argv)
        report = train(cfg)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if report and int(os.environ.get("RANK", "0")) == 0:
        print(
            f"final ({cfg['name']}): top-1 {report['top1']:.2f} | Many {report['many']:.2f} | "
            f"Medium {report['medium']:.2f} | Few {report['few']:.2f} | "
            f"best validation top-1 {report['best_top1']:.2f} (epoch {report['best_epoch']})"
        )
        if "test" in report:
            t = report["test"]
            print(
                f"test at epoch {report['best_epoch']} ({cfg['name']}): top-1 {t['top1']:.2f} | Many {t['many']:.2f} | "
                f"Medium {t['medium']:.2f} | Few {t['few']:.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
