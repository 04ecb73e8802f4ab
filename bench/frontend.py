"""Throughput of kws's batched log-mel front end against librosa in a per-clip loop, same settings, same run.

    python bench/frontend.py [--clips 2048] [--batch 256] [--repeats 3]

Prints clips/s for each at every thread count up to the machine's, and the ratio. Exit 0 always.
"""

from __future__ import annotations

import argparse
import time

import librosa
import numpy as np
import torch
from machine import describe

from kws.config import FeatureConfig
from kws.features import FrontEnd


def librosa_logmel(clip: np.ndarray, config: FeatureConfig) -> np.ndarray:
    power = librosa.feature.melspectrogram(
        y=clip,
        sr=config.sample_rate,
        n_fft=config.fft_size,
        hop_length=config.hop_length,
        win_length=config.win_length,
        n_mels=config.n_mels,
        fmin=config.f_min,
        fmax=config.f_max_hz,
    )
    return librosa.power_to_db(power, ref=1.0, amin=config.log_floor, top_db=None)


def best_rate(run, clips: int, repeats: int) -> float:
    """Clips per second of the fastest of `repeats` runs (the least disturbed by other work)."""
    run()  # warm-up: allocations, librosa's numba and caches
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return clips / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=2048)
    parser.add_argument("--librosa-clips", type=int, default=512, help="librosa is slower: time fewer clips")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = FeatureConfig()
    rng = np.random.default_rng(0)
    waveforms = (0.1 * rng.standard_normal((args.clips, config.clip_samples))).astype(np.float32)
    batches = torch.from_numpy(waveforms).split(args.batch)
    front_end = FrontEnd(config)

    def run_kws() -> None:
        with torch.no_grad():
            for batch in batches:
                front_end(batch)

    def run_librosa() -> None:
        for clip in waveforms[: args.librosa_clips]:
            librosa_logmel(clip, config)

    reference = librosa_logmel(waveforms[0], config)
    ours = front_end(torch.from_numpy(waveforms[:1]))[0].numpy()
    print(f"{describe()}; librosa {librosa.__version__}")
    print(
        f"settings: logmel, {config.sample_rate} Hz, {config.window_ms:g} ms window, {config.hop_ms:g} ms hop, "
        f"n_fft {config.fft_size}, {config.n_mels} mels, {config.clip_s:g} s clips; kws batch {args.batch}, "
        f"device cpu; max |kws - librosa| = {np.abs(ours - reference).max():.2e} dB"
    )
    print()
    print(f"{'threads':>7}  {'kws clips/s':>12}  {'librosa clips/s':>15}  {'ratio':>6}")
    for threads in range(1, torch.get_num_threads() + 1):
        torch.set_num_threads(threads)
        kws_rate = best_rate(run_kws, args.clips, args.repeats)
        librosa_rate = best_rate(run_librosa, args.librosa_clips, args.repeats)
        print(f"{threads:>7}  {kws_rate:>12.0f}  {librosa_rate:>15.0f}  {kws_rate / librosa_rate:>5.1f}x")
    if torch.cuda.is_available():
        device_front_end = FrontEnd(config).cuda()
        device_batches = [batch.cuda() for batch in batches]

        def run_cuda() -> None:
            with torch.no_grad():
                for batch in device_batches:
                    device_front_end(batch)
            torch.cuda.synchronize()

        rate = best_rate(run_cuda, args.clips, args.repeats)
        print(f"cuda ({torch.cuda.get_device_name()}): {rate:.0f} clips/s")


if __name__ == "__main__":
    main()
