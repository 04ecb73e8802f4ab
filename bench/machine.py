"""One line describing where a benchmark ran, for the top of its table."""

from __future__ import annotations

import os

import torch

from kws.card import cpu_model


def describe(device: str = "cpu") -> str:
    gpu = f", {torch.cuda.get_device_name()}" if device != "cpu" and torch.cuda.is_available() else ""
    return (
        f"machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; device {device}{gpu}"
    )
