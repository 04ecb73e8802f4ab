"""`kws viz`: each picture is written with its panels, shows the right numbers, and Grad-CAM points at the word."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
from typer.testing import CliRunner

from kws.audio import load_audio
from kws.checkpoint import ModelInfo, load_model, save_checkpoint
from kws.cli import app
from kws.config import FeatureConfig, ModelConfig
from kws.errors import ConfigError
from kws.models import build_model
from kws.models.firnet import mel_band_edges
from kws.stream_test import speech_extent
from kws.viz import grad_cam, plot_activations, plot_cam, plot_features, plot_filters

FEATURES = FeatureConfig(clip_s=0.5)
LABELS = ("_silence_", "_unknown_", "yes", "no")


def small_model(preset: str, features: FeatureConfig = FEATURES) -> tuple[torch.nn.Module, ModelInfo]:
    torch.manual_seed(0)
    architecture, arguments = ModelConfig(preset).architecture()
    model = build_model(architecture, arguments, len(LABELS), features).eval()
    return model, ModelInfo(architecture, arguments, features, LABELS)


def is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


@pytest.fixture
def clip(tmp_path, write_wav, tone, noise):
    return write_wav(tmp_path / "clip.wav", noise(0.8, rms=0.01) + tone(600, 0.8, amplitude=0.2), 16000)


@pytest.mark.parametrize("preset", ["resnet_tiny", "firnet_small"])
def test_features_shows_the_waveform_and_the_models_own_front_end(preset, clip, tmp_path):
    model, info = small_model(preset)
    plot = plot_features(model, info, clip, tmp_path / "features.png")
    assert is_png(plot.path)
    assert len(plot.panels) == 2 and "waveform" in plot.panels[0]
    with torch.no_grad():
        expected = model.front_end(torch.from_numpy(load_audio(clip, 16000))[None])[0].numpy()
    np.testing.assert_array_equal(plot.data["features"], expected)


def test_filters_of_the_2d_model_are_its_first_layer_kernels(tmp_path):
    model, info = small_model("resnet_tiny")
    plot = plot_filters(model, info, tmp_path / "filters.png")
    assert is_png(plot.path)
    kernels = model.stem[0].weight.detach()[:, 0].numpy()
    np.testing.assert_array_equal(plot.data["kernels"], kernels)
    assert len(plot.panels) == len(kernels)  # one titled patch per kernel
    assert sorted(plot.data["order"]) == list(range(len(kernels)))


def test_filters_of_an_untrained_fir_model_sit_on_the_mel_scale_as_initialised(tmp_path):
    model, info = small_model("firnet_small", FeatureConfig(clip_s=0.5, f_min=100.0))
    plot = plot_filters(model, info, tmp_path / "fir.png")
    assert is_png(plot.path)
    assert len(plot.panels) == 3 and "impulse responses" in plot.panels[0]
    centres = np.sort(plot.data["centres"])
    mel_centres = mel_band_edges(40, 100.0, 8000.0).mean(axis=1)
    # Untrained, the filters are the initial ones: each peaks near its mel band's centre.
    assert np.median(np.abs(centres - mel_centres) / mel_centres) < 0.05
    assert plot.data["initial"] is not None


def test_activations_show_the_input_and_every_stage(clip, tmp_path):
    model, info = small_model("resnet_tiny")
    plot = plot_activations(model, info, clip, tmp_path / "activations.png", channels=2)
    assert is_png(plot.path)
    assert plot.data["layers"] == ["input (front end)", "stem", "stage 1", "stage 2", "stage 3", "stage 4"]
    assert len(plot.panels) == 1 + 5 * 2


def test_cam_names_the_label_it_explains_and_refuses_unknown_labels(clip, tmp_path):
    model, info = small_model("resnet_tiny")
    plot = plot_cam(model, info, clip, tmp_path / "cam.png", label="no")
    assert is_png(plot.path) and len(plot.panels) == 2 and "'no'" in plot.panels[1]
    result = plot.data["result"]
    assert result.cam.shape == result.features.shape and 0 <= result.cam.min() and result.cam.max() <= 1
    with pytest.raises(ConfigError, match="'maybe' is not one of the model's labels"):
        plot_cam(model, info, clip, tmp_path / "cam2.png", label="maybe")


def test_cam_of_a_keyword_in_the_second_half_of_a_clip_is_strongest_there(shared_data, noise):
    model, info = load_model("speech_commands")
    checked = 0
    for path in sorted((shared_data / "speech_commands" / "yes").glob("*.wav")):
        word = load_audio(path, 16000)
        start_s, end_s = speech_extent(word, 16000)
        if end_s - start_s > 0.45:  # only words that fit in the second half
            continue
        clip = noise(1.0, rms=0.002, seed=checked)
        speech = word[round(start_s * 16000) : round(end_s * 16000)]
        clip[16000 - len(speech) - 800 : 16000 - 800] += speech
        result = grad_cam(model, info, torch.from_numpy(clip)[None])
        assert result.label == "yes", path.name
        over_time = result.cam.sum(axis=0)
        half = len(over_time) // 2
        assert over_time[half:].sum() > 2 * over_time[:half].sum(), path.name
        checked += 1
        if checked == 5:
            break
    assert checked == 5


def test_viz_commands_write_their_pngs_and_name_bad_input(tmp_path, clip):
    model, info = small_model("firnet_small")
    checkpoint = tmp_path / "fir.safetensors"
    save_checkpoint(checkpoint, model, info)
    runner = CliRunner()
    for args in (["features", clip, "--model", checkpoint], ["filters", checkpoint], ["activations", checkpoint, clip],
                 ["cam", checkpoint, clip]):  # fmt: skip
        out = tmp_path / f"{args[0]}.png"
        result = runner.invoke(app, ["viz", *map(str, args), "--out", str(out)])
        assert result.exit_code == 0, result.stderr
        assert is_png(out) and f"wrote {out}" in result.stderr
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio")
    result = runner.invoke(app, ["viz", "cam", str(checkpoint), str(broken), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "broken.wav: not a readable audio file" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_matplotlib_is_imported_only_by_the_viz_commands():
    code = "import sys, kws.cli, kws.stream, kws.classify, kws.train; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_clip_longer_than_the_window_is_explained_at_its_loudest_window(tmp_path, noise, tone):
    model, info = small_model("resnet_tiny")
    audio = noise(3.0, rms=0.005)
    audio[32000:36000] += tone(800, 0.25)
    path = tmp_path / "long.wav"
    soundfile.write(str(path), audio, 16000)
    result = plot_cam(model, info, path, tmp_path / "cam.png").data["result"]
    assert result.features.shape[-1] == FEATURES.num_frames(FEATURES.clip_samples)
