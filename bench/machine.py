"""One line describing where a benchmark ran, for the top of its table."""

from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: str = "cpu") -> str:
    gpu = f", {torch.cuda.get_device_name()}" if device != "cpu" and torch.cuda.is_available() else ""
    return (
        f"machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; device {device}{gpu}"
    )
