"""The one feature front end: log-power STFT, log-mel and MFCC, batched on CPU or GPU, offline or streaming.

Every command (extract, train, evaluate, classify, stream, listen, viz) computes features here.
"""

from __future__ import annotations

import librosa
import numpy as np
import scipy.fft
import torch
from torch import nn

from kws.config import FeatureConfig

# CPU batches are cut into parts this size: their frames stay in cache (measured fastest on 2 cores).
_CPU_BATCH = 32


def mel_filterbank(config: FeatureConfig) -> np.ndarray:
    """Slaney-style mel filters as librosa builds them: (n_mels, n_fft // 2 + 1), float32."""
    return librosa.filters.mel(
        sr=config.sample_rate,
        n_fft=config.fft_size,
        n_mels=config.n_mels,
        fmin=config.f_min,
        fmax=config.f_max_hz,
    ).astype(np.float32)


def dct_matrix(n_mfcc: int, n_mels: int) -> np.ndarray:
    """Orthonormal DCT-II as a matrix, (n_mfcc, n_mels): mfcc = matrix @ log_mel (as librosa.feature.mfcc)."""
    return scipy.fft.dct(np.eye(n_mels), type=2, norm="ortho", axis=0)[:n_mfcc].astype(np.float32)


class FrontEnd(nn.Module):
    """Waveform to features: (batch, samples) float32 at `config.sample_rate` -> (batch, n_features, frames).

    Runs on whatever device the module is moved to. `forward` also applies the configured
    normalisation; `frames` gives the features before it (what the streaming front end yields).
    """

    def __init__(self, config: FeatureConfig) -> None:
        super().__init__()
        self.config = config
        # A periodic Hann window centred in n_fft samples, as torch.stft and librosa pad it.
        window = torch.hann_window(config.win_length, periodic=True)
        left = (config.fft_size - config.win_length) // 2
        window = nn.functional.pad(window, (left, config.fft_size - config.win_length - left))
        self.register_buffer("window", window, persistent=False)
        if config.kind in ("logmel", "mfcc"):
            filters = torch.from_numpy(mel_filterbank(config))
            self.register_buffer("mel_filters", filters, persistent=False)
        if config.kind == "mfcc":
            dct = torch.from_numpy(dct_matrix(config.n_mfcc, config.n_mels))
            self.register_buffer("dct", dct, persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.frames(waveform))

    def frames(self, waveform: torch.Tensor) -> torch.Tensor:
        """Centred frames, as librosa with center=True: (batch, samples) -> (batch, n_features, frames)."""
        if waveform.dim() == 1:
            waveform = waveform.unsqueeze(0)
        pad = self.config.fft_size // 2
        return self.uncentred_frames(nn.functional.pad(waveform, (pad, pad)))

    def uncentred_frames(self, padded: torch.Tensor) -> torch.Tensor:
        """Frame t from samples [t * hop, t * hop + n_fft) of `padded`: (batch, samples) -> (batch, F, T)."""
        if padded.device.type == "cpu" and len(padded) > _CPU_BATCH:
            return torch.cat([self.uncentred_frames(part) for part in padded.split(_CPU_BATCH)])
        with in_float32(padded):
            return self._uncentred_frames(padded.float())

    def _uncentred_frames(self, padded: torch.Tensor) -> torch.Tensor:
        config = self.config
        # Frame-major layout (batch, frames, bins) keeps the FFT input and the power contiguous,
        # which is several times faster on CPU than torch.stft's (batch, bins, frames).
        windowed = padded.unfold(-1, config.fft_size, config.hop_length) * self.window
        spectrum = torch.view_as_real(torch.fft.rfft(windowed))
        power = spectrum[..., 0].square() + spectrum[..., 1].square()
        if config.kind != "stft":
            power = torch.matmul(power, self.mel_filters.T)
        decibels = 10.0 * torch.log10(power.clamp_min(config.log_floor))
        if config.kind == "mfcc":
            decibels = torch.matmul(decibels, self.dct.T)
        return decibels.transpose(-1, -2)

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        """Apply the configured per-clip normalisation over the last (time) axis."""
        return normalize_over_time(features, self.config.normalization)


def in_float32(tensor: torch.Tensor) -> torch.autocast:
    """Autocast turned off on `tensor`'s device: front ends compute in float32 even when training
    runs in mixed precision, since in float16 loud frames overflow the power spectrum, quiet ones
    underflow the log floor, and a model would then hear other features than at inference."""
    return torch.autocast(tensor.device.type, enabled=False)


def normalize_over_time(features: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-clip normalisation of (..., n_features, frames): "none", "mean" (each feature's mean over
    the frames taken away) or "meanvar" (also divided by its standard deviation)."""
    if mode == "none":
        return features
    centred = features - features.mean(dim=-1, keepdim=True)
    if mode == "mean":
        return centred
    return centred / (centred.std(dim=-1, keepdim=True, unbiased=False) + 1e-5)


class StreamingFrontEnd:
    """Feeds audio in chunks of any size and yields the same frames the offline front end computes.

    `push(chunk)` returns the frames completed by that chunk, (n_features, k) with k >= 0; `flush()`
    ends the stream and returns the last frames. Frames are unnormalised (`FrontEnd.frames`); a
    detector normalises each window it scores with `FrontEnd.normalize`.
    """

    def __init__(self, front_end: FrontEnd) -> None:
        self.front_end = front_end
        self.config = front_end.config
        self.device = front_end.window.device
        # Centring pads n_fft // 2 zeros before the first sample; the buffer starts with them.
        self._buffer = np.zeros(self.config.fft_size // 2, dtype=np.float32)
        self.frames_emitted = 0

    def push(self, chunk: np.ndarray) -> torch.Tensor:
        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
        self._buffer = np.concatenate([self._buffer, chunk])
        return self._emit()

    def flush(self) -> torch.Tensor:
        self._buffer = np.concatenate([self._buffer, np.zeros(self.config.fft_size // 2, np.float32)])
        return self._emit()

    def _emit(self) -> torch.Tensor:
        n_fft, hop = self.config.fft_size, self.config.hop_length
        ready = 0 if len(self._buffer) < n_fft else 1 + (len(self._buffer) - n_fft) // hop
        if ready == 0:
            return torch.empty(self.config.n_features, 0, device=self.device)
        used = (ready - 1) * hop + n_fft
        segment = torch.from_numpy(self._buffer[:used]).to(self.device)
        with torch.no_grad():
            frames = self.front_end.uncentred_frames(segment.unsqueeze(0))[0]
        self._buffer = self._buffer[ready * hop :]
        self.frames_emitted += ready
        return frames
