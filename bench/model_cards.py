"""Measure the model card of each shipped model (and store it with --write).

    python bench/model_cards.py [--data ../shared/data] [--runs runs/reproduce] [--write]

For each model in models/: `kws.card.measure_card` on the testing split of its dataset (accuracy,
per-class recall, streaming hits and false accepts per hour, MACs, CPU latency), plus how it was
trained: the README's command, seed, epochs, best epoch, and, when `--runs` holds the run that
`bench/reproduce.py` made of it, the minutes it took. Prints each card; exit 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from machine import describe

from kws.card import card_lines, measure_card, write_card
from kws.checkpoint import SHIPPED_MODELS, read_info
from kws.train import where

DEFAULT_DATA = Path(os.environ.get("KWS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SHIPPED = {  # name: (dataset folder under --data, the command that trains it)
    "speech_commands": ("speech_commands", "kws train recipes/speech_commands.yaml"),
    "speech_commands12": ("speech_commands", "kws train recipes/speech_commands12.yaml"),
    "speech_commands_fir": ("speech_commands", "kws train recipes/speech_commands_fir.yaml"),
    "fsdd": ("fsdd", "kws train recipes/fsdd.yaml --init speech_commands"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--runs", type=Path, help="bench/reproduce.py's folder: training minutes come from there")
    parser.add_argument("--only", nargs="*", choices=list(SHIPPED), default=list(SHIPPED))
    parser.add_argument("--write", action="store_true", help="store each card in its model file")
    args = parser.parse_args()

    print(describe())
    for name in args.only:
        path = SHIPPED_MODELS / f"{name}.safetensors"
        folder, command = SHIPPED[name]
        info = read_info(path)
        # Models of Speech Commands' words also count false accepts on continuous speech without keywords.
        negatives = args.data / "negatives" / "manifest.csv" if folder == "speech_commands" else None
        card = measure_card(path, args.data / folder, on_step=lambda text, name=name: print(f"{name}: {text}"),
                            negatives=negatives)  # fmt: skip
        training = {"command": command, "seed": info.recipe["train"]["seed"], "epochs": info.recipe["train"]["epochs"],
                    "best_epoch": info.metrics.get("best_epoch")}  # fmt: skip
        metrics = args.runs / name / "metrics.json" if args.runs else None
        if metrics and metrics.is_file():
            seconds = sum(epoch["seconds"] for epoch in json.loads(metrics.read_text()))
            training |= {"minutes": round(seconds / 60, 1), "where": where(torch.device("cpu"))}
        card["training"] = {**training, **info.card.get("training", {})}  # what training recorded wins
        if args.write:
            write_card(path, card)
        print("\n".join(card_lines(name, replace(info, card=card))) + "\n", flush=True)


if __name__ == "__main__":
    main()
