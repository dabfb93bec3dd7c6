"""`acl-train --nproc-per-node N [--max-restarts R] ...`: N training processes on this machine under torchrun.

torchrun restarts every worker when one is lost (up to --max-restarts times); the run continues
from its last checkpoint (--resume auto). torchrun is started with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1:
each round of workers then meets on a store of its own rather than the elastic agent's, which still
holds the lost round's addresses (train/run.py keeps the rounds apart a second way, for a plain
`torchrun` command: a store prefix per restart).
"""

from __future__ import annotations

import os
import sys


def _take(argv: list[str], flag: str) -> tuple[str | None, list[str]]:
    """The value of `flag` (--a-b, --a_b, --a-b=v) and argv without it."""
    names = {flag, "--" + flag[2:].replace("-", "_")}
    rest, value, it = [], None, iter(argv)
    for a in it:
        key, eq, v = a.partition("=")
        if key in names:
            value = v if eq else next(it, None)
            if value is None:
                raise SystemExit(f"error: {flag} needs a value")
        else:
            rest.append(a)
    return value, rest


def torchrun_command(argv: list[str]) -> list[str] | None:
    """The torchrun command that runs `argv` on --nproc-per-node processes; None: run in this process."""
    nproc, rest = _take(argv, "--nproc-per-node")
    restarts, rest = _take(rest, "--max-restarts")
    if nproc is None:
        if restarts is not None:
            raise SystemExit("error: --max-restarts needs --nproc-per-node")
        return None
    if not nproc.isdigit() or int(nproc) < 1:
        raise SystemExit(f"error: --nproc-per-node must be a whole number >= 1, got {nproc!r}")
    launch = ["--standalone", "--nproc-per-node", nproc, "--max-restarts", restarts or "0"]
    return [sys.executable, "-m", "torch.distributed.run", *launch, "-m", __package__, *rest]


def exec_torchrun(command: list[str]) -> None:
    """Replace this process by torchrun (signals such as a scheduler's SIGTERM reach it directly)."""
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    sys.stdout.flush()
    os.execve(command[0], command, env)
