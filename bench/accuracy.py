"""kws's models against two reference models from their papers, trained in one run on the same data,
augmentation and epoch budget; prints parameters, time per epoch and accuracy.

    python bench/accuracy.py [--recipe recipes/speech_commands.yaml] [--epochs 20] [--out runs/bench-accuracy]

References, written from the papers' descriptions:
- res8 (Tang & Lin, "Deep Residual Learning for Small-Footprint Keyword Spotting", ICASSP 2018):
  40 MFCCs, a 3x3 convolution with 45 maps, 4x3 average pooling, 6 more 3x3 convolutions in 3 residual
  pairs with BatchNorm (no affine), global average pooling, softmax. No dropout.
- M5 (Dai et al., "Very Deep Convolutional Neural Networks for Raw Waveforms", ICASSP 2017): raw
  waveform, a 80-tap stride-4 convolution with 128 maps, then 3-tap convolutions with 128, 256, 512
  maps, each with BatchNorm, ReLU and 4x max pooling, global average pooling, softmax.
Exit 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from machine import describe
from torch import nn

from kws.config import FeatureConfig, load_recipe
from kws.features import FrontEnd
from kws.models import ARCHITECTURES
from kws.train import train


class Res8(nn.Module):
    """Tang & Lin's res8 over (batch, 40 MFCC, frames)."""

    def __init__(self, num_classes: int, features: FeatureConfig, maps: int = 45, layers: int = 6,
                 pool: tuple[int, int] = (4, 3), dropout: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        self.front_end = FrontEnd(features)
        self.conv0 = nn.Conv2d(1, maps, 3, padding=1, bias=False)
        self.pool = nn.AvgPool2d(pool)
        self.convs = nn.ModuleList(nn.Conv2d(maps, maps, 3, padding=1, bias=False) for _ in range(layers))
        self.norms = nn.ModuleList(nn.BatchNorm2d(maps, affine=False) for _ in range(layers))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(maps, num_classes)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.classify(self.front_end(waveform))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        x = features.transpose(1, 2).unsqueeze(1)  # the paper's input is (time, frequency)
        x = self.pool(torch.relu(self.conv0(x)))
        residual = x
        for index, (conv, norm) in enumerate(zip(self.convs, self.norms), start=1):
            y = torch.relu(conv(x))
            if index % 2 == 0:
                y = y + residual
                residual = y
            x = norm(y)
        return self.head(self.dropout(x.mean(dim=(2, 3))))


class M5(nn.Module):
    """Dai et al.'s M5 over the raw waveform."""

    def __init__(self, num_classes: int, features: FeatureConfig, dropout: float = 0.0) -> None:
        super().__init__()
        self.front_end = nn.Identity()
        layers, channels = [], 1
        for out_channels, kernel, stride in ((128, 80, 4), (128, 3, 1), (256, 3, 1), (512, 3, 1)):
            layers += [
                nn.Conv1d(channels, out_channels, kernel, stride=stride, padding=kernel // 2),
                nn.BatchNorm1d(out_channels),
                nn.ReLU(),
                nn.MaxPool1d(4),
            ]
            channels = out_channels
        self.layers = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.classify(waveform)

    def classify(self, waveform: torch.Tensor) -> torch.Tensor:
        x = self.layers(waveform.unsqueeze(1))
        return self.head(self.dropout(x.mean(dim=2)))


ARCHITECTURES.setdefault("res8", Res8)
ARCHITECTURES.setdefault("m5", M5)

# run folder -> (name shown, recipe overrides); every run shares the recipe's data, augmentation,
# schedule and epochs. res8 gets the MFCCs of its paper (and, like it, no SpecAugment).
CANDIDATES = {
    "resnet_small": ("kws resnet_small", ["model.name=resnet_small"]),
    "firnet_base": ("kws firnet_base", ["model.name=firnet_base"]),
    "res8": ("res8 (Tang & Lin 2018)", [
        "model.name=res8", "model.dropout=0.0", "features.kind=mfcc", "features.n_mfcc=40",
        "features.f_max=4000", "train.augment.freq_masks=0", "train.augment.time_masks=0",
    ]),
    "m5": ("M5 (Dai et al. 2017)", ["model.name=m5", "model.dropout=0.0"]),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/speech_commands.yaml")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default="runs/bench-accuracy")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--only", nargs="*", choices=list(CANDIDATES), help="run only these candidates")
    args = parser.parse_args()

    rows = []
    for folder, (name, overrides) in CANDIDATES.items():
        if args.only and folder not in args.only:
            continue
        recipe = load_recipe(args.recipe, [*overrides, f"train.epochs={args.epochs}"])
        run_dir = Path(args.out) / folder
        print(f"training {name} into {run_dir} ...", flush=True)
        result = train(recipe, run_dir, device=args.device, resume=(run_dir / "state.safetensors").exists())
        seconds = sum(record.seconds for record in result.history) / len(result.history)
        rows.append((name, result.parameters, seconds, result.best_validation_accuracy,
                     result.test.accuracy if result.test else math.nan))  # fmt: skip

    print()
    print(describe(args.device))
    print(f"recipe: {args.recipe}; {args.epochs} epochs each; same clips, augmentation and schedule")
    print(f"{'model':<26} {'params':>8} {'s/epoch':>8} {'best val %':>10} {'test %':>7}")
    for name, parameters, seconds, validation, test in rows:
        print(f"{name:<26} {parameters:>8,} {seconds:>8.1f} {100 * validation:>10.2f} {100 * test:>7.2f}")


if __name__ == "__main__":
    main()
