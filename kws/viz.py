"""Pictures of what a model sees and learned: front-end features, first-layer filters, activations, Grad-CAM.

Every function writes one PNG (titles, labelled axes with units, colour bars) and returns what it drew,
so tests can check the numbers behind the picture. matplotlib is imported here only, and this module
only by the `kws viz` commands.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from kws.audio import fit_length, load_audio  # noqa: E402
from kws.checkpoint import ModelInfo  # noqa: E402
from kws.config import FeatureConfig
from kws.errors import ConfigError  # noqa: E402
from kws.models.firnet import FIRFilterBank, bandpass_taps, mel_band_edges  # noqa: E402
from kws.onnx_model import require_layers  # noqa: E402

ORIENTATION_NOTE = (
    "How to read a kernel (frequency up, time right): a horizontal stripe answers a sustained band (a vowel's "
    "formant, a hum); a vertical stripe a broadband transient (a plosive, a click); a diagonal a rising or "
    "falling formant (a glide between sounds)."
)


@dataclass(frozen=True)
class Plot:
    """A written PNG, the titles of its panels, and the numbers drawn in it."""

    path: Path
    panels: tuple[str, ...]
    data: dict


def _save(figure, out: str | Path, data: dict) -> Plot:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    panels = tuple(axis.get_title() for axis in figure.axes if axis.get_title())
    figure.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return Plot(out, panels, data)


def _is_fir(model: nn.Module) -> bool:
    return isinstance(model.front_end, FIRFilterBank)


def band_frequencies(model: nn.Module, features: FeatureConfig) -> tuple[np.ndarray, str]:
    """The frequency (Hz) each row of the model's front-end output stands for, and what the rows are."""
    if _is_fir(model):
        return filter_responses(model.front_end)[2], "learned FIR filter"
    if features.kind == "stft":
        return np.linspace(0, features.sample_rate / 2, features.fft_size // 2 + 1), "STFT bin"
    import librosa

    centres = librosa.mel_frequencies(features.n_mels + 2, fmin=features.f_min, fmax=features.f_max_hz)[1:-1]
    return centres, "mel band" if features.kind == "logmel" else "mel band (before the DCT)"


def _frequency_ticks(axis, frequencies: np.ndarray, count: int = 6) -> None:
    rows = np.linspace(0, len(frequencies) - 1, count).round().astype(int)
    axis.set_yticks(rows)
    axis.set_yticklabels([f"{frequencies[row]:.0f}" for row in rows])


# Features ------------------------------------------------------------------------------------------


def plot_features(model: nn.Module, info: ModelInfo, wav: str | Path, out: str | Path) -> Plot:
    """Waveform and the model's own front-end output for a whole file; data: the features (F, frames)."""
    require_layers(model, "kws viz")
    features = info.features
    waveform = load_audio(wav, features.sample_rate)
    with torch.no_grad():
        output = model.front_end(torch.from_numpy(waveform)[None])[0].numpy()
    duration_s = len(waveform) / features.sample_rate
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, height_ratios=(1, 2))
    top.plot(np.arange(len(waveform)) / features.sample_rate, waveform, linewidth=0.6)
    top.set(title=f"{Path(wav).name}: waveform ({features.sample_rate} Hz)", ylabel="amplitude")
    image = bottom.imshow(output, origin="lower", aspect="auto", cmap="magma", extent=(0, duration_s, -0.5,
                          len(output) - 0.5), interpolation="nearest")  # fmt: skip
    name = "learned FIR filter bank energies" if _is_fir(model) else f"{features.kind} front end"
    bottom.set(title=f"{name} ({features.window_ms:g} ms windows every {features.hop_ms:g} ms)", xlabel="time (s)")
    if features.kind == "mfcc" and not _is_fir(model):
        bottom.set_ylabel("MFCC coefficient")
        bottom.set_yticks(np.linspace(0, len(output) - 1, 5).round())
    else:
        frequencies, rows = band_frequencies(model, features)
        order = np.argsort(frequencies) if _is_fir(model) else np.arange(len(output))
        image.set_data(output[order])
        _frequency_ticks(bottom, frequencies[order])
        bottom.set_ylabel(f"{rows} (centre, Hz)")
    figure.colorbar(image, ax=[top, bottom], label="level (dB)", shrink=0.6)
    return _save(figure, out, {"features": output, "waveform": waveform})


# Filters -------------------------------------------------------------------------------------------


def filter_responses(bank: FIRFilterBank, taps: np.ndarray | None = None, points: int = 512):
    """(frequencies Hz, magnitude dB (filters, points), centre Hz, bandwidth Hz) of FIR filters.

    The centre is the frequency of the peak; the bandwidth spans where the response is within 3 dB of it.
    """
    taps = bank.conv.weight.detach()[:, 0].numpy() if taps is None else taps
    rate = bank.features.sample_rate
    spectrum = np.abs(np.fft.rfft(taps, n=2 * (points - 1), axis=1))
    decibels = 20 * np.log10(spectrum / spectrum.max(axis=1, keepdims=True) + 1e-6)
    frequencies = np.linspace(0, rate / 2, points)
    peaks = decibels.argmax(axis=1)
    bandwidths = np.array([_band_around(row, peak, frequencies) for row, peak in zip(decibels, peaks)])
    return frequencies, decibels, frequencies[peaks], bandwidths


def _band_around(decibels: np.ndarray, peak: int, frequencies: np.ndarray) -> float:
    """Width in Hz of the stretch around the peak that stays within 3 dB of it."""
    low = high = peak
    while low > 0 and decibels[low - 1] >= -3.0:
        low -= 1
    while high < len(decibels) - 1 and decibels[high + 1] >= -3.0:
        high += 1
    return float(frequencies[high] - frequencies[low])


def initial_taps(bank: FIRFilterBank, init: str) -> np.ndarray | None:
    """The filters training started from, when they are known (mel-spaced band-pass initialisation)."""
    if init != "mel":
        return None
    taps = bank.conv.weight.shape[-1]
    edges = mel_band_edges(bank.conv.out_channels, bank.features.f_min, bank.features.f_max_hz)
    return bandpass_taps(edges, taps, bank.features.sample_rate)


def plot_filters(model: nn.Module, info: ModelInfo, out: str | Path) -> Plot:
    """First-layer filters: 2D kernels as time-frequency patches, or FIR impulse and magnitude responses."""
    require_layers(model, "kws viz")
    if _is_fir(model):
        return _plot_fir_filters(model.front_end, info, out)
    return _plot_kernels(model, info, out)


def _plot_kernels(model: nn.Module, info: ModelInfo, out: str | Path) -> Plot:
    kernels = model.stem[0].weight.detach()[:, 0].numpy()  # (channels, frequency, time)
    order = np.argsort(-np.abs(kernels).reshape(len(kernels), -1).sum(axis=1))  # strongest first
    columns = min(8, len(kernels))
    rows = -(-len(kernels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.4 * columns, 1.5 * rows + 1.2), squeeze=False)
    limit = float(np.abs(kernels).max())
    for axis in axes.flat:
        axis.set_axis_off()
    for axis, index in zip(axes.flat, order):
        image = axis.imshow(kernels[index], origin="lower", cmap="RdBu_r", vmin=-limit, vmax=limit)
        axis.set_title(f"#{index}", fontsize=8)
        axis.set_axis_on()
        axis.set_xticks([]), axis.set_yticks([])
    axes[0, 0].set_ylabel("frequency", fontsize=8)
    axes[-1, 0].set_xlabel("time", fontsize=8)
    height, width = kernels.shape[1:]
    figure.suptitle(
        f"first-layer kernels of {info.architecture}: {len(kernels)} kernels of {height} {info.features.kind} rows "
        f"x {width} frames ({width * info.features.hop_ms:g} ms), strongest first"
    )
    figure.colorbar(image, ax=axes, label="weight", shrink=0.6)
    figure.text(0.02, -0.02, ORIENTATION_NOTE, wrap=True, fontsize=8)
    return _save(figure, out, {"kernels": kernels, "order": order})


def _plot_fir_filters(bank: FIRFilterBank, info: ModelInfo, out: str | Path) -> Plot:
    rate = bank.features.sample_rate
    taps = bank.conv.weight.detach()[:, 0].numpy()
    frequencies, decibels, centres, bandwidths = filter_responses(bank)
    order = np.argsort(centres)
    start = initial_taps(bank, info.arguments.get("init", "mel"))
    figure, (impulses, magnitudes, summary) = plt.subplots(
        3, 1, figsize=(10, 14), height_ratios=(3, 2, 2), layout="constrained"
    )
    time_ms = (np.arange(taps.shape[1]) - (taps.shape[1] - 1) / 2) / rate * 1000
    peak = np.maximum(np.abs(taps).max(axis=1), 1e-12)
    for rank, index in enumerate(order):
        impulses.plot(time_ms, rank + 0.45 * taps[index] / peak[index], linewidth=0.7)
    impulses.set(title=f"{len(taps)} learned FIR filters ({taps.shape[1]} taps at {rate} Hz): impulse responses, "
                 "each scaled to its peak, sorted by centre frequency", xlabel="time (ms)",
                 ylabel="filter (sorted by centre)")  # fmt: skip
    image = magnitudes.imshow(decibels[order], origin="lower", aspect="auto", cmap="viridis", vmin=-40, vmax=0,
                              extent=(0, rate / 2, -0.5, len(taps) - 0.5))  # fmt: skip
    magnitudes.set(title="magnitude responses (each normalised to its peak)", xlabel="frequency (Hz)",
                   ylabel="filter (sorted by centre)")  # fmt: skip
    figure.colorbar(image, ax=magnitudes, label="gain (dB)")
    ranks = np.arange(len(taps))
    summary.errorbar(ranks, centres[order], yerr=bandwidths[order] / 2, fmt="o", markersize=3, capsize=2,
                     label="learned: centre, -3 dB bandwidth")  # fmt: skip
    if start is not None:
        _, _, start_centres, start_widths = filter_responses(bank, start)
        start_order = np.argsort(start_centres)
        before = "before training (mel-spaced band-pass)"
        summary.errorbar(ranks + 0.3, start_centres[start_order], yerr=start_widths[start_order] / 2, fmt="s",
                         markersize=3, capsize=2, alpha=0.6, label=before)  # fmt: skip
    edges = mel_band_edges(len(taps), bank.features.f_min, bank.features.f_max_hz)
    summary.plot(ranks, edges.mean(axis=1), color="grey", linestyle="--", label="mel scale (evenly spaced in mel)")
    summary.set(title="centre frequencies and bandwidths against the mel scale", xlabel="filter rank by centre",
                ylabel="frequency (Hz)")  # fmt: skip
    summary.legend(fontsize=8)
    return _save(figure, out, {"centres": centres, "bandwidths": bandwidths, "order": order, "initial": start})


# Activations and Grad-CAM --------------------------------------------------------------------------


def model_window(info: ModelInfo, wav: str | Path) -> torch.Tensor:
    """One model window of a file, as inference sees it: (1, samples), the loudest stretch of a long file."""
    features = info.features
    return torch.from_numpy(fit_length(load_audio(wav, features.sample_rate), features.clip_samples))[None]


def _stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = [("input (front end)", model.front_end)]
    if hasattr(model, "stem"):
        layers.append(("stem", model.stem))
    layers += [(f"stage {number}", stage) for number, stage in enumerate(model.stages, start=1)]
    return layers


def plot_activations(model: nn.Module, info: ModelInfo, wav: str | Path, out: str | Path, channels: int = 3) -> Plot:
    """Per-layer maps for one clip: the `channels` strongest channels of each stage, on the clip's time axis."""
    require_layers(model, "kws viz")
    captured: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda module, inputs, output, name=name: captured.__setitem__(name, output))
             for name, layer in _stages(model)]  # fmt: skip
    with torch.no_grad():
        model(model_window(info, wav))
    for hook in hooks:
        hook.remove()
    clip_s = info.features.clip_s
    names = list(captured)
    figure, axes = plt.subplots(len(names), channels, figsize=(3.2 * channels, 1.9 * len(names)), squeeze=False)
    strongest = {}
    for row, name in enumerate(names):
        maps = captured[name][0].numpy()
        if name.startswith("input"):
            maps = maps[None]
        maps = maps if maps.ndim == 3 else maps[:, None, :]  # 1D stages: (channels, 1, time)
        order = np.argsort(-maps.reshape(len(maps), -1).mean(axis=1))[:channels]
        strongest[name] = order
        for column in range(channels):
            axis = axes[row, column]
            if column >= len(order):
                axis.set_axis_off()
                continue
            image = axis.imshow(maps[order[column]], origin="lower", aspect="auto", cmap="magma",
                                extent=(0, clip_s, -0.5, maps.shape[1] - 0.5))  # fmt: skip
            title = name if name.startswith("input") else f"{name}, channel {order[column]}"
            axis.set_title(f"{title} ({maps.shape[1]}x{maps.shape[2]})", fontsize=8)
            axis.set_ylabel("frequency row" if maps.shape[1] > 1 else "", fontsize=7)
            axis.set_xlabel("time (s)", fontsize=7)
            figure.colorbar(image, ax=axis, label="dB" if name.startswith("input") else "activation")
            if name.startswith("input"):
                for spare in axes[row, 1:]:
                    spare.set_axis_off()
                break
    figure.suptitle(f"activations of {info.architecture} for {Path(wav).name}: the strongest channels of each stage")
    figure.tight_layout()
    return _save(figure, out, {"layers": names, "strongest": strongest})


@dataclass(frozen=True)
class ClassActivation:
    label: str
    probability: float
    cam: np.ndarray  # (front-end rows, frames) for the 2D model, (frames,) for the FIR model, in [0, 1]
    features: np.ndarray  # the front-end output it is drawn over


def grad_cam(model: nn.Module, info: ModelInfo, waveform: torch.Tensor, label: str | None = None) -> ClassActivation:
    """Grad-CAM (Selvaraju et al. 2017) on the last stage: where in time and frequency the evidence for
    `label` (default: the predicted one) lies, upsampled to the front-end output's size."""
    if label is not None and label not in info.labels:
        raise ConfigError(f"--label: {label!r} is not one of the model's labels ({', '.join(info.labels)})")
    model = model.eval()
    captured = {}
    last = model.stages[-1]
    forward_hook = last.register_forward_hook(lambda module, inputs, output: captured.__setitem__("maps", output))
    try:
        with torch.enable_grad():
            features = model.front_end(waveform)
            logits = model.classify(features)
            index = int(logits.argmax()) if label is None else info.labels.index(label)
            maps = captured["maps"]
            (gradients,) = torch.autograd.grad(logits[0, index], maps)
    finally:
        forward_hook.remove()
    spatial = tuple(range(2, maps.dim()))
    weights = gradients.mean(dim=spatial, keepdim=True)
    cam = torch.relu((weights * maps).sum(dim=1, keepdim=True)).detach()
    target = features.shape[-2:] if maps.dim() == 4 else features.shape[-1:]
    mode = "bilinear" if maps.dim() == 4 else "linear"
    cam = nn.functional.interpolate(cam, size=tuple(target), mode=mode, align_corners=False)[0, 0].numpy()
    cam = cam / cam.max() if cam.max() > 0 else cam
    probability = float(torch.softmax(logits.detach(), dim=1)[0, index])
    return ClassActivation(info.labels[index], probability, cam, features.detach()[0].numpy())


def plot_cam(model: nn.Module, info: ModelInfo, wav: str | Path, out: str | Path, label: str | None = None) -> Plot:
    """The Grad-CAM map over the clip's spectrogram (or filter-bank energies) for one label; data: `result`."""
    require_layers(model, "kws viz")
    result = grad_cam(model, info, model_window(info, wav), label)
    clip_s = info.features.clip_s
    frequencies, rows = band_frequencies(model, info.features)
    if _is_fir(model):  # draw the filters' rows in order of their centre frequencies
        order = np.argsort(frequencies)
        frequencies = frequencies[order]
        result = ClassActivation(result.label, result.probability, result.cam, result.features[order])
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    extent = (0, clip_s, -0.5, len(result.features) - 0.5)
    image = left.imshow(result.features, origin="lower", aspect="auto", cmap="magma", extent=extent)
    left.set(title=f"{Path(wav).name}: front end", xlabel="time (s)", ylabel=f"{rows} (centre, Hz)")
    figure.colorbar(image, ax=left, label="level (dB)")
    right.imshow(result.features, origin="lower", aspect="auto", cmap="gray", extent=extent)
    cam = result.cam if result.cam.ndim == 2 else np.tile(result.cam, (len(result.features), 1))
    overlay = right.imshow(cam, origin="lower", aspect="auto", cmap="jet", alpha=0.5, extent=extent, vmin=0, vmax=1)
    right.set(title=f"Grad-CAM for {result.label!r} (p = {result.probability:.2f})", xlabel="time (s)")
    figure.colorbar(overlay, ax=right, label="relevance (normalised)")
    if not (info.features.kind == "mfcc" and not _is_fir(model)):
        _frequency_ticks(left, frequencies)
    return _save(figure, out, {"result": result})
