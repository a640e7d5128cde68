"""Preempting a CLI job in a test: a SIGTERM sent from inside the job at a chosen call, as a scheduler would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import importlib, os, signal, sys
module, attr = {patch!r}.split(":")
owner = importlib.import_module(module)
for name in attr.split(".")[:-1]:
    owner = getattr(owner, name)
method = attr.split(".")[-1]
real, calls = getattr(owner, method), [0]
def hooked(*a, **k):
    calls[0] += 1
    if calls[0] == {at_call} and os.environ.get("RANK", "0") in {ranks!r}:
        os.killpg(os.getpgid(0), signal.SIGTERM) if {whole_group} else os.kill(os.getpid(), signal.SIGTERM)
    return real(*a, **k)
setattr(owner, method, hooked)
sys.exit(importlib.import_module({cli!r}).main(sys.argv[1:]))
"""


def preempt_script(cli: str, patch: str, at_call: int, ranks=("0",), whole_group: bool = True) -> str:
    """Python source that runs `cli`'s main (e.g. "cli.mapet") on its argv and, in the at_call-th call of
    `patch` ("module:Class.method") on the given torchrun ranks, sends SIGTERM to its whole process group
    (as SLURM signals every process of a job, loader workers included) or only to itself."""
    return SCRIPT.format(patch=patch, at_call=at_call, ranks=tuple(ranks), whole_group=whole_group, cli=cli)


def run_preempted(cli: str, patch: str, at_call: int, argv: list[str]) -> tuple[int, str]:
    """Run preempt_script in its own process group (the signal reaches the job alone); (exit status, stderr)."""
    r = subprocess.run(
        [sys.executable, "-c", preempt_script(cli, patch, at_call), *argv],
        cwd=ROOT,
        capture_output=True,
        start_new_session=True,
        timeout=300,
    )
    return r.returncode, r.stderr.decode()
