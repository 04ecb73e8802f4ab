"""Live audio from a sound card through sounddevice (PortAudio): devices, capture at the device's own
rate, resampling to the model's, and the listening loop that feeds the streaming detector.
"""

from __future__ import annotations

import math
import queue
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kws.audio import StreamResampler
from kws.errors import DeviceError
from kws.stream import Detection, KeywordDetector

NO_AUDIO_TIMEOUT_S = 10.0  # a started stream's first block can take ~2 s (PulseAudio); none in 10 s is a fault


def _sounddevice():
    try:
        import sounddevice
    except OSError:
        raise DeviceError(
            "the PortAudio library is missing: install it (Debian/Ubuntu: apt install libportaudio2)"
        ) from None
    except ImportError:
        raise DeviceError("sounddevice is not installed: pip install 'kws[microphone]'") from None
    return sounddevice


@dataclass(frozen=True)
class InputDevice:
    index: int
    name: str
    channels: int
    sample_rate: int  # the device's default rate, which capture uses
    is_default: bool


def input_devices() -> list[InputDevice]:
    """Every device with at least one input channel, as PortAudio sees them."""
    sounddevice = _sounddevice()
    try:
        default = sounddevice.default.device[0]
        devices = sounddevice.query_devices()
    except sounddevice.PortAudioError as error:
        raise DeviceError(f"cannot list sound devices ({error})") from None
    return [
        InputDevice(
            index, info["name"], info["max_input_channels"], round(info["default_samplerate"]), index == default
        )  # fmt: skip
        for index, info in enumerate(devices)
        if info["max_input_channels"] > 0
    ]


def find_input_device(device: str | None) -> InputDevice:
    """The default input, or the one with this index, or whose name contains this text."""
    devices = input_devices()
    if not devices:
        raise DeviceError("no audio input devices found (no microphone, or no sound server running)")
    if device is None:
        chosen = [d for d in devices if d.is_default] or devices[:1]
    elif device.isdigit():
        chosen = [d for d in devices if d.index == int(device)]
    else:
        chosen = [d for d in devices if d.name == device] or [d for d in devices if device.lower() in d.name.lower()]
    if not chosen:
        names = ", ".join(f"{d.index}: {d.name}" for d in devices)
        raise DeviceError(f"no input device {device!r} (inputs: {names}; see kws listen --list-devices)")
    return chosen[0]


class Microphone:
    """Mono capture from one input device at its own rate, delivered resampled to `sample_rate` in blocks.

    Use as a context manager; `read()` returns the next block (float32, (samples,)).
    """

    def __init__(self, device: InputDevice, sample_rate: int, block_s: float = 0.1) -> None:
        self.device = device
        self.sample_rate = sample_rate
        self.block_s = block_s
        self._blocks: queue.Queue[np.ndarray] = queue.Queue()
        self._resampler = StreamResampler(device.sample_rate, sample_rate)
        self._stream = None
        self.overflows = 0

    def __enter__(self) -> Microphone:
        sounddevice = _sounddevice()

        def on_audio(data, frames, time_info, status) -> None:
            if status.input_overflow:
                self.overflows += 1
            self._blocks.put(data[:, 0].copy())

        try:
            self._stream = sounddevice.InputStream(
                samplerate=self.device.sample_rate, channels=1, dtype="float32", device=self.device.index,
                blocksize=max(1, round(self.block_s * self.device.sample_rate)), callback=on_audio,
            )  # fmt: skip
            self._stream.start()
        except (sounddevice.PortAudioError, ValueError) as error:
            name = f"input device {self.device.index} ({self.device.name})"
            raise DeviceError(f"{name}: cannot open it, busy or gone ({error})") from None
        return self

    def __exit__(self, *exc_info) -> None:
        if self._stream is not None:
            # abort, not stop: nothing captured after this point is wanted, and stop waits for pending
            # buffers, which can stall on a sound server that is slow to answer.
            self._stream.abort()
            self._stream.close()
            self._stream = None

    def read(self, timeout_s: float = NO_AUDIO_TIMEOUT_S) -> np.ndarray:
        try:
            block = self._blocks.get(timeout=timeout_s)
        except queue.Empty:
            raise DeviceError(
                f"input device {self.device.index} ({self.device.name}): no audio for {timeout_s:g} s"
            ) from None
        return self._resampler.push(block)


@dataclass
class ListenSummary:
    seconds: float = 0.0  # audio heard
    detections: list[Detection] = field(default_factory=list)
    interrupted: bool = False
    overflows: int = 0


def level_dbfs(block: np.ndarray) -> float:
    """RMS level of a block in dB relative to full scale (-inf for digital silence)."""
    power = float(np.mean(np.square(block, dtype=np.float64))) if len(block) else 0.0
    return 10 * math.log10(power) if power > 0 else -math.inf


def listen(
    detector: KeywordDetector,
    microphone: Microphone,
    duration_s: float | None = None,
    on_ready: Callable[[], None] | None = None,
    on_audio: Callable[[float, float, list[Detection]], None] | None = None,
) -> ListenSummary:
    """Feed the microphone to the detector until `duration_s` of audio is heard or Ctrl-C.

    `on_ready` runs when the first audio arrives; `on_audio(seconds heard, level dBFS, new detections)`
    after every block. Ctrl-C ends listening cleanly (the summary says so) instead of raising.
    """
    summary = ListenSummary()
    samples = 0
    try:
        with microphone:
            first = microphone.read()
            if on_ready:
                on_ready()
            block = first
            while True:
                samples += len(block)
                found = detector.push(block)
                summary.detections.extend(found)
                if on_audio:
                    on_audio(samples / detector.sample_rate, level_dbfs(block), found)
                if duration_s is not None and samples >= duration_s * detector.sample_rate:
                    break
                block = microphone.read()
    except KeyboardInterrupt:
        summary.interrupted = True
    summary.seconds = samples / detector.sample_rate
    summary.overflows = microphone.overflows
    return summary
