"""Train each shipped model again from its recipe and seed, and compare with the file in models/.

    python bench/reproduce.py [--out runs/reproduce] [--only speech_commands ...]

Runs the command each model's card says made it (the README's: `kws train recipes/<name>.yaml`, fsdd
with `--init speech_commands`) into OUT/<name>, reusing a finished run there, then prints per model:
the shipped and the reproduced test accuracy, their difference (the goal: within 0.5 points), whether
the weights are identical, and the training time (the sum of the epochs' seconds, on this machine).
Exit 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from machine import describe

from kws.checkpoint import SHIPPED_MODELS, read_info, read_tensors

REPO = Path(__file__).resolve().parents[1]
MODELS = sorted(path.stem for path in SHIPPED_MODELS.glob("*.safetensors"))


def train(name: str, out: Path) -> None:
    """Run the command the shipped model's card says made it (`kws train recipes/<name>.yaml ...`) into `out`."""
    if (out / "report.json").is_file():
        print(f"{name}: reusing the finished run in {out}")
        return
    words = shlex.split(read_info(SHIPPED_MODELS / f"{name}.safetensors").card["training"]["command"])
    command = [sys.executable, "-m", *words, "--out", str(out)]
    print("running", shlex.join(command[2:]), flush=True)
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "reproduce")
    parser.add_argument("--only", nargs="*", choices=MODELS, default=MODELS)
    args = parser.parse_args()

    print(describe())
    rows = []
    for name in args.only:
        run = args.out / name
        train(name, run)
        shipped = read_info(SHIPPED_MODELS / f"{name}.safetensors").metrics["test"]["accuracy"]
        reproduced = json.loads((run / "report.json").read_text())["test"]["accuracy"]
        ours, theirs = read_tensors(SHIPPED_MODELS / f"{name}.safetensors", "model"), read_tensors(run, "model")
        identical = ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
        minutes = sum(epoch["seconds"] for epoch in json.loads((run / "metrics.json").read_text())) / 60
        rows.append((name, shipped, reproduced, identical, minutes))

    print(f"\n{'model':<20} {'shipped test %':>14} {'reproduced %':>12} {'difference':>10}  {'same weights':>12}  "
          f"{'training min':>12}")  # fmt: skip
    for name, shipped, reproduced, identical, minutes in rows:
        print(f"{name:<20} {100 * shipped:>14.2f} {100 * reproduced:>12.2f} {100 * (reproduced - shipped):>+10.2f}  "
              f"{'yes' if identical else 'no':>12}  {minutes:>12.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
