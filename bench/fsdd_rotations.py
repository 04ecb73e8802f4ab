"""FSDD by held-out speaker: for each of the speakers, train on the others and test on that one.

    python bench/fsdd_rotations.py [--recipe recipes/fsdd.yaml] [--init MODEL] [--out runs/fsdd-rotations]
                                   [--set KEY=VALUE ...]

Every rotation uses the recipe as it is, with no validation speaker (all but the test speaker train;
the last epoch is kept). Prints per-rotation accuracy and the mean. Exit 0 whatever the figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from machine import describe

from kws.config import load_recipe
from kws.data import load_dataset
from kws.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/fsdd.yaml")
    parser.add_argument("--init", default=None, help="start every rotation from this trained model")
    parser.add_argument("--out", default="runs/fsdd-rotations")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    base = load_recipe(args.recipe, args.set)
    # The dataset's own speakers; clips borrowed for training are never tested on.
    speakers = sorted({clip.speaker for clip in load_dataset(base.data.own_recordings()).clips})
    rows = []
    for speaker in speakers:
        overrides = [*args.set, f"data.testing_speakers=[{speaker}]", "data.validation_speakers=[]"]
        recipe = load_recipe(args.recipe, overrides)
        run_dir = Path(args.out) / f"test-{speaker}"
        print(f"rotation: test on {speaker}, train on the others -> {run_dir}", flush=True)
        result = train(recipe, run_dir, device=args.device, init=args.init,
                       resume=(run_dir / "state.safetensors").exists())  # fmt: skip
        recall = {label: result.test.recall[i] for i, label in enumerate(result.test.labels)}
        rows.append((speaker, result.test.accuracy, min(recall, key=recall.get), min(recall.values())))

    print()
    print(describe(args.device))
    print(f"recipe: {args.recipe} {' '.join(args.set)}; init: {args.init or 'none'}")
    print(f"{'test speaker':<14} {'accuracy %':>10}  {'worst class (recall %)':<24}")
    for speaker, accuracy, worst, worst_recall in rows:
        print(f"{speaker:<14} {100 * accuracy:>10.2f}  {worst} ({100 * worst_recall:.1f})")
    mean = sum(row[1] for row in rows) / len(rows)
    print(f"{'mean':<14} {100 * mean:>10.2f}")


if __name__ == "__main__":
    main()
