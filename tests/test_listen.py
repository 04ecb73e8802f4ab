"""`kws listen` on a real (virtual) sound device: a PulseAudio null sink whose monitor is the microphone.

Recordings are played into the sink with paplay while `kws listen` runs in a subprocess, so the whole
path is exercised: PortAudio capture at the device's rate, resampling, the streaming detector, output.
"""

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

from kws.checkpoint import load_model
from kws.stream import KeywordDetector, detect_in_file, detector_config_for
from kws.stream_test import make_stream_test, read_word_times

pytestmark = pytest.mark.skipif(shutil.which("pulseaudio") is None, reason="PulseAudio is not installed")


def kws_command(*args) -> list[str]:
    return [sys.executable, "-m", "kws", *map(str, args)]


def wait_for_line(process: subprocess.Popen, text: str, timeout_s: float) -> str:
    """Read the process's stderr until a line contains `text`; fail with what it said otherwise."""
    said = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stderr], [], [], 0.5)
        if ready:
            line = process.stderr.readline()
            if not line:
                break
            said.append(line)
            if text in line:
                return line
    process.kill()
    pytest.fail(f"kws listen never said {text!r}; it said: {''.join(said)}")


def test_listen_detects_keywords_played_into_the_microphone_at_the_right_times(
    virtual_microphone, shared_data, tmp_path
):
    # Seed 7: six words (go, off, stop, right, yes, down) of which the shipped model's calibrated
    # detector finds four well above their thresholds, and two other words it must let pass.
    test = make_stream_test(shared_data / "speech_commands", tmp_path / "played.wav", split="testing", max_words=6,
                            gap_s=(1.5, 2.0), seed=7)  # fmt: skip
    model, info = load_model("speech_commands")
    own = detector_config_for(info)  # what kws listen runs: the card's calibrated detector
    offline = detect_in_file(KeywordDetector(model, info.labels, info.features, own), test.wav).detections
    # Capture resamples (16 kHz -> the device's 44.1 kHz -> 16 kHz), which moves scores a little: a
    # detection offline at a lower threshold may or may not fire live, a confident one must.
    low = detector_config_for(info, threshold=0.5)
    possible = detect_in_file(KeywordDetector(model, info.labels, info.features, low), test.wav).detections
    confident = [detection for detection in offline if detection.score >= own.threshold_of(detection.keyword) + 0.05]
    assert len(confident) >= 2

    events = tmp_path / "events.jsonl"
    listening = subprocess.Popen(kws_command("listen", "--duration", test.duration_s + 2.5, "--output", events),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for_line(listening, "listening on", timeout_s=60)
    subprocess.run(["paplay", f"--device={virtual_microphone}", str(test.wav)], check=True, timeout=120)
    stdout, stderr = listening.communicate(timeout=60)
    assert listening.returncode == 0, stderr
    live = [json.loads(line) for line in events.read_text().splitlines()]
    assert [json.loads(line) for line in stdout.splitlines()] == live  # stdout is no terminal: JSON lines there too
    assert "done: listened" in stderr

    # Live times are offline times plus one delay (when playing started after listening did): the
    # delay that lines up the most live events with the own detector's offline detections of the same
    # keyword, then with those at the lower threshold.
    def lined_up(delay: float, detections: list) -> int:
        return sum(
            any(d.keyword == event["keyword"] and abs(event["time_s"] - delay - d.time_s) <= 0.25 for d in detections)
            for event in live
        )

    found = offline + possible
    candidates = [event["time_s"] - d.time_s for event in live for d in found if d.keyword == event["keyword"]]
    assert candidates, (live, possible)
    delay = max(candidates, key=lambda delay: (lined_up(delay, offline), lined_up(delay, possible)))

    def live_event_near(time_s: float) -> dict | None:
        return min(live, key=lambda event: abs(event["time_s"] - delay - time_s), default=None)

    for detection in confident:
        event = live_event_near(detection.time_s)
        assert event and event["keyword"] == detection.keyword, (detection, live)
        assert abs(event["time_s"] - delay - detection.time_s) <= 0.25
    for event in live:
        nearest = min(possible, key=lambda detection: abs(event["time_s"] - delay - detection.time_s))
        assert nearest.keyword == event["keyword"] and abs(event["time_s"] - delay - nearest.time_s) <= 0.35
    # And each fires soon after its word ends.
    word_ends = [word.word_end_s for word in read_word_times(test.details)]
    for detection in offline:
        assert -0.3 <= detection.time_s - min(word_ends, key=lambda end: abs(end - detection.time_s)) <= 0.6


def test_listen_names_a_missing_input_device(virtual_microphone):
    result = subprocess.run(kws_command("listen", "--device", "no-such-microphone", "--duration", "1"),
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2
    assert "no input device 'no-such-microphone'" in result.stderr and "Traceback" not in result.stderr


def test_listen_lists_the_virtual_device(virtual_microphone):
    result = subprocess.run(kws_command("listen", "--list-devices"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pulse" in result.stdout


def test_listen_without_any_sound_device_says_so(tmp_path):
    environment = {**os.environ, "PULSE_SERVER": f"unix:{tmp_path}/nothing-here", "XDG_RUNTIME_DIR": str(tmp_path)}
    result = subprocess.run(kws_command("listen", "--duration", "1"), capture_output=True, text=True, timeout=60,
                            env=environment)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "error:" in result.stderr and "Traceback" not in result.stderr


def ignore_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize(
    "stop, started_ignoring_ctrl_c",
    [(signal.SIGINT, False), (signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c", "ctrl-c-in-a-background-job", "kill"],
)
def test_ctrl_c_or_kill_stops_listening_cleanly_with_a_summary(virtual_microphone, stop, started_ignoring_ctrl_c):
    # A background job of a non-interactive shell starts with SIGINT ignored, as CI may run the tests.
    environment = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # SIGABRT dumps every thread's stack
    start = ignore_ctrl_c if started_ignoring_ctrl_c else None
    listening = subprocess.Popen(kws_command("listen"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=environment, preexec_fn=start)  # fmt: skip
    wait_for_line(listening, "listening on", timeout_s=60)
    listening.send_signal(stop)
    try:
        stdout, stderr = listening.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        listening.send_signal(signal.SIGABRT)
        stdout, stderr = listening.communicate(timeout=30)
        pytest.fail(f"kws listen did not stop within 30 s of {stop.name}; where it was:\n{stderr}")
    assert listening.returncode == 0, stderr
    assert "stopped: listened" in stderr and "Traceback" not in stderr
