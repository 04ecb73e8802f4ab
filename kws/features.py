"""The one feature front end: log-power STFT, log-mel and MFCC, batched on CPU or GPU, offline or streaming.

Every command (extract, train, evaluate, classify, stream, listen, viz) computes features here.
"""

from __future__ import annotations

import math

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
        self.exported_spectrum = MatrixSpectrum(config, window) if MatrixSpectrum.factors(config) else None

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
        # Not when exporting (kws export): the graph keeps the batch size open.
        if padded.device.type == "cpu" and not torch.compiler.is_exporting() and len(padded) > _CPU_BATCH:
            return torch.cat([self.uncentred_frames(part) for part in padded.split(_CPU_BATCH)])
        with in_float32(padded):
            return self._uncentred_frames(padded.float())

    def _uncentred_frames(self, padded: torch.Tensor) -> torch.Tensor:
        config = self.config
        if self.exported_spectrum is not None and torch.compiler.is_exporting():
            power = self.exported_spectrum(padded)
        else:
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


class MatrixSpectrum(nn.Module):
    """The power spectrum of windowed frames by two stages of DFT matrices, for exported graphs (kws export):
    (batch, padded samples) -> (batch, frames, n_fft // 2 + 1), as `FrontEnd` computes it with an FFT.

    onnxruntime's DFT operator (and the gather that frames the signal for it) ran the log-mel front end at
    1.84 ms a clip on one CPU thread, this at 0.40 ms (torch's FFT: 0.22 ms). With n_fft = N1 * N2 and the
    hop a multiple of N2 (a frame's sample n = N2 * n1 + n2, its bin k = k1 + N1 * k2): the signal as rows
    of N2 samples, so that a frame is N1 rows taken at a stride; an N1-point DFT over n1 (one matrix
    product for all frames); then, for each k1, one matrix product over n2 that also applies the twiddle
    factors.
    """

    def __init__(self, config: FeatureConfig, window: torch.Tensor) -> None:
        super().__init__()
        self.rows, self.columns = MatrixSpectrum.factors(config)  # N1, N2
        self.stride = config.hop_length // self.columns  # rows from one frame to the next
        self.hop_length, self.fft_size, self.bins = config.hop_length, config.fft_size, config.fft_size // 2 + 1
        self.bands = math.ceil(self.bins / self.rows)  # k2 values needed
        n1 = np.arange(self.rows)
        first = 2 * np.pi * np.outer(n1, n1) / self.rows  # (k1, n1)
        n2, k2 = np.arange(self.columns), np.arange(self.bands)
        # For each k1: X[k1 + N1 k2] = sum over n2 of A[k1, n2] * exp(-2 pi i n2 (k1 + N1 k2) / n_fft).
        second = -2 * np.pi * n2[None, :, None] * (n1[:, None, None] + self.rows * k2[None, None, :]) / self.fft_size
        for name, values in (("first_cos", np.cos(first)), ("first_sin", -np.sin(first)),
                             ("second_cos", np.cos(second)), ("second_sin", np.sin(second))):  # fmt: skip
            self.register_buffer(name, torch.from_numpy(values.astype(np.float32)), persistent=False)
        self.register_buffer("window", window.reshape(self.rows, 1, 1, self.columns), persistent=False)

    @staticmethod
    def factors(config: FeatureConfig) -> tuple[int, int] | None:
        """(N1, N2), or None when the hop and n_fft share too small a factor for the matrices to pay off."""
        columns = math.gcd(config.hop_length, config.fft_size)
        return (config.fft_size // columns, columns) if columns >= 8 else None

    def forward(self, padded: torch.Tensor) -> torch.Tensor:
        batch = padded.shape[0]
        frames = 1 + (padded.shape[1] - self.fft_size) // self.hop_length
        rows = padded[:, : padded.shape[1] // self.columns * self.columns].reshape(batch, -1, self.columns)
        last = self.stride * (frames - 1) + 1
        # (N1, batch, frames, N2): frame t's row n1 is row stride * t + n1 of the signal.
        framed = torch.stack([rows[:, row : row + last : self.stride] for row in range(self.rows)]) * self.window
        flat = framed.reshape(self.rows, -1)
        real = torch.matmul(self.first_cos, flat).reshape(self.rows, -1, self.columns)  # (k1, batch * frames, n2)
        imaginary = torch.matmul(self.first_sin, flat).reshape(self.rows, -1, self.columns)
        spectrum_real = torch.matmul(real, self.second_cos) - torch.matmul(imaginary, self.second_sin)
        spectrum_imaginary = torch.matmul(real, self.second_sin) + torch.matmul(imaginary, self.second_cos)
        power = spectrum_real * spectrum_real + spectrum_imaginary * spectrum_imaginary  # (k1, batch * frames, k2)
        power = power.permute(1, 2, 0).reshape(batch, frames, self.bands * self.rows)  # bin k1 + N1 * k2
        return power[..., : self.bins]


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
