"""Raw-waveform CNN whose first layer is a bank of learnable FIR filters: waveform in, logits out.

The filters (free taps, optionally initialised as band-pass filters spaced on the mel scale, as in
SincNet) are followed by a log-energy envelope at the front end's hop, then 1D Conv + BatchNorm +
ReLU stages with residual connections and pooling, global average pooling, dropout and a linear layer.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from kws.config import FeatureConfig
from kws.features import in_float32, normalize_over_time
from kws.models.resnet import residual_stages


def mel_band_edges(n_filters: int, f_min: float, f_max: float) -> np.ndarray:
    """(n_filters, 2) low and high edges in Hz of bands spaced evenly on the mel scale, overlapping by half."""
    mel = np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_filters + 2)
    hz = _mel_to_hz(mel)
    return np.stack([hz[:-2], hz[2:]], axis=1)


def _hz_to_mel(hz: float | np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10 ** (mel / 2595.0) - 1.0)


def bandpass_taps(edges_hz: np.ndarray, taps: int, sample_rate: int) -> np.ndarray:
    """Hamming-windowed sinc band-pass filters, (n_filters, taps), unit gain at each band's centre."""
    t = (np.arange(taps) - (taps - 1) / 2) / sample_rate
    window = np.hamming(taps)
    filters = []
    for low, high in edges_hz:
        response = 2 * high * np.sinc(2 * high * t) - 2 * low * np.sinc(2 * low * t)
        response *= window
        centre = (low + high) / 2
        gain = abs(np.sum(response * np.exp(-2j * math.pi * centre * t)))
        filters.append(response / max(gain, 1e-8))
    return np.stack(filters).astype(np.float32)


class FIRFilterBank(nn.Module):
    """Learnable FIR filters and their log-energy envelope: (batch, samples) -> (batch, n_filters, frames).

    Frames are taken every `hop_ms`, each the mean energy over `window_ms`, centred as the log-mel
    front end's, so both models see the same frame rate; `features.normalization` applies as there.
    """

    def __init__(
        self, features: FeatureConfig, n_filters: int = 40, taps: int = 101, stride: int = 2, init: str = "mel"
    ) -> None:
        super().__init__()
        if init not in ("mel", "random"):
            raise ValueError(f"init must be 'mel' or 'random', not {init!r}")
        self.features = features
        self.stride = stride
        self.conv = nn.Conv1d(1, n_filters, taps, stride=stride, padding=taps // 2, bias=False)
        if init == "mel":
            edges = mel_band_edges(n_filters, features.f_min, features.f_max_hz)
            self.conv.weight.data.copy_(torch.from_numpy(bandpass_taps(edges, taps, features.sample_rate))[:, None])
        self.window = max(1, round(features.win_length / stride))
        self.hop = max(1, round(features.hop_length / stride))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        with in_float32(waveform):
            return self._log_energies(waveform.float())

    def _log_energies(self, waveform: torch.Tensor) -> torch.Tensor:
        filtered = self.conv(waveform.unsqueeze(1))
        energy = nn.functional.avg_pool1d(
            filtered.square(), self.window, self.hop, padding=self.window // 2, count_include_pad=True
        )
        decibels = 10.0 * torch.log10(energy + self.features.log_floor)
        return normalize_over_time(decibels, self.features.normalization)


class KeywordFIRNet(nn.Module):
    """(batch, samples) waveform -> (batch, num_classes) logits; the FIR bank is its front end."""

    def __init__(
        self,
        num_classes: int,
        features: FeatureConfig,
        n_filters: int = 40,
        taps: int = 101,
        stride: int = 2,
        init: str = "mel",
        widths: tuple[int, ...] = (64, 64, 96, 128),
        pools: tuple[int, ...] = (2, 2, 2, 1),
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.front_end = FIRFilterBank(features, n_filters, taps, stride, init)
        self.input_norm = nn.BatchNorm1d(n_filters)
        self.stages = residual_stages(n_filters, widths, pools, dims=1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.classify(self.front_end(waveform))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, n_filters, frames) filter-bank energies -> (batch, num_classes) logits."""
        x = self.stages(self.input_norm(features))
        return self.head(self.dropout(x.mean(dim=2)))
