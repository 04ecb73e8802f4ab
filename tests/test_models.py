"""Models: every preset maps waveforms to logits; the FIR bank starts as mel-spaced band-pass filters."""

import json

import numpy as np
import pytest
import torch

import kws.models
from kws.config import PRESETS, FeatureConfig, ModelConfig
from kws.errors import ConfigError
from kws.features import FrontEnd
from kws.models import build_model, count_parameters, optimize_for_inference
from kws.models.firnet import FIRFilterBank, KeywordFIRNet, mel_band_edges
from kws.models.resnet import KeywordResNet
from kws.settings import build

FEATURES = FeatureConfig(clip_s=0.5)

# What the comments in kws/models/__init__.py claim, for 9 classes and 40 mel bands.
CLAIMED_PARAMETERS = {
    "resnet_tiny": 17_000,
    "resnet_small": 68_000,
    "resnet_medium": 133_000,
    "resnet_base": 269_000,
    "resnet_wide": 269_000,
    "firnet_base": 205_000,
    "firnet_wide": 780_000,
}


def preset_model(name: str, num_classes: int, features: FeatureConfig = FEATURES) -> torch.nn.Module:
    architecture, arguments = ModelConfig(name=name).architecture()
    return build_model(architecture, arguments, num_classes, features)


@pytest.fixture
def waveforms(chirp, noise) -> torch.Tensor:
    """Three half-second clips: a sweep over the speech band, and two noises."""
    clips = [chirp(100, 7000, 0.5, amplitude=0.3), noise(0.5, seed=1), noise(0.5, rms=0.01, seed=2)]
    return torch.from_numpy(np.stack(clips))


@pytest.mark.parametrize("num_classes", [2, 12])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_maps_a_batch_of_waveforms_to_one_logit_per_class(preset, num_classes, waveforms):
    model = preset_model(preset, num_classes).eval()
    with torch.no_grad():
        logits = model(waveforms)
    assert logits.shape == (3, num_classes)
    assert torch.isfinite(logits).all()


def resnet_parameters(widths: tuple[int, ...], num_classes: int) -> int:
    """Counted by hand from the layers kws/models/resnet.py describes (a BatchNorm has 2 per channel)."""

    def block(inputs: int, outputs: int) -> int:
        skip = 0 if inputs == outputs else inputs * outputs + 2 * outputs
        return 9 * inputs * outputs + 2 * outputs + 9 * outputs * outputs + 2 * outputs + skip

    input_norm = 2
    stem = 9 * widths[0] + 2 * widths[0]
    stages = sum(block(inputs, outputs) for inputs, outputs in zip((widths[0], *widths[:-1]), widths))
    head = widths[-1] * num_classes + num_classes
    return input_norm + stem + stages + head


@pytest.mark.parametrize("preset", [name for name, (architecture, _) in PRESETS.items() if architecture == "resnet"])
def test_resnet_presets_have_the_parameters_counted_by_hand(preset):
    widths = PRESETS[preset][1]["widths"]
    assert count_parameters(preset_model(preset, 9, FeatureConfig())) == resnet_parameters(widths, 9)


@pytest.mark.parametrize("preset", CLAIMED_PARAMETERS)
def test_presets_have_about_as_many_parameters_as_their_comments_claim(preset):
    parameters = count_parameters(preset_model(preset, 9, FeatureConfig()))
    assert parameters == pytest.approx(CLAIMED_PARAMETERS[preset], rel=0.05)


def test_presets_of_each_architecture_grow_in_the_order_they_are_listed_and_all_differ():
    for architecture in ("resnet", "firnet"):
        names = [name for name, (kind, _) in PRESETS.items() if kind == architecture]
        counts = [count_parameters(preset_model(name, 9, FeatureConfig())) for name in names]
        assert counts == sorted(counts), (names, counts)
        arguments = [repr(sorted(PRESETS[name][1].items())) for name in names]
        assert len(set(arguments)) == len(arguments)


@pytest.mark.parametrize("preset", ["resnet_tiny", "firnet_small"])
def test_forward_equals_classify_of_the_front_end(preset, waveforms):
    """Training calls the two halves separately (SpecAugment goes between them); inference calls forward."""
    model = preset_model(preset, 5).eval()
    with torch.no_grad():
        assert torch.equal(model(waveforms), model.classify(model.front_end(waveforms)))


def test_resnet_front_end_is_the_one_front_end_of_kws(waveforms):
    model = preset_model("resnet_tiny", 5)
    with torch.no_grad():
        assert torch.equal(model.front_end(waveforms), FrontEnd(FEATURES)(waveforms))


def fir_peak_frequencies(bank: FIRFilterBank, sample_rate: int) -> tuple[np.ndarray, float]:
    """Where each filter's magnitude response peaks (Hz), from a zero-padded FFT of its taps, and the
    spacing of that frequency grid."""
    taps = bank.conv.weight.detach().numpy()[:, 0, :].astype(np.float64)
    size = 1 << 15
    response = np.abs(np.fft.rfft(taps, n=size, axis=1))
    return np.fft.rfftfreq(size, 1 / sample_rate)[response.argmax(axis=1)], sample_rate / size


# A 101-tap filter (6.3 ms at 16 kHz) cannot pass a band much narrower than ~200 Hz without passing 0 Hz
# too, so the mel bands start at 100 Hz here; see the test below for the default 20 Hz.
@pytest.mark.parametrize(
    "features",
    [
        FeatureConfig(f_min=100.0),
        FeatureConfig(f_min=150.0, f_max=7600.0),
        FeatureConfig(sample_rate=8000, f_min=100.0),
    ],
    ids=["16k-100-8000", "16k-150-7600", "8k-100-4000"],
)
def test_mel_initialised_fir_filters_peak_inside_their_bands_at_rising_frequencies(features):
    bank = FIRFilterBank(features, init="mel")
    peaks, resolution = fir_peak_frequencies(bank, features.sample_rate)
    assert np.all(np.diff(peaks) > 0), peaks
    assert features.f_min - resolution <= peaks.min() and peaks.max() <= features.f_max_hz + resolution
    edges = mel_band_edges(40, features.f_min, features.f_max_hz)
    assert np.all((edges[:, 0] - resolution <= peaks) & (peaks <= edges[:, 1] + resolution)), (peaks, edges)


@pytest.mark.xfail(strict=True, reason="the two lowest bands (20-115 and 20-166 Hz) are too narrow for 101 taps")
def test_mel_initialised_fir_filters_peak_inside_their_bands_with_the_default_20_hz_floor():
    bank = FIRFilterBank(FeatureConfig(), init="mel")
    peaks, resolution = fir_peak_frequencies(bank, 16000)
    assert peaks.min() >= 20.0 - resolution and np.all(np.diff(peaks) > 0), peaks


def test_random_fir_initialisation_is_not_the_mel_filters():
    mel = FIRFilterBank(FEATURES, init="mel").conv.weight
    random = FIRFilterBank(FEATURES, init="random").conv.weight
    assert mel.shape == random.shape
    correlation = torch.nn.functional.cosine_similarity(mel.flatten(1), random.flatten(1), dim=1)
    assert correlation.abs().max() < 0.5


def test_an_unknown_fir_initialisation_is_refused():
    with pytest.raises(ValueError, match="init"):
        FIRFilterBank(FEATURES, init="zeros")


@pytest.mark.parametrize(
    "features",
    [
        FeatureConfig(clip_s=0.5),
        FeatureConfig(clip_s=1.0),
        FeatureConfig(clip_s=0.73, window_ms=25.0),
        FeatureConfig(sample_rate=8000, clip_s=1.0, f_max=4000.0),
        FeatureConfig(clip_s=1.0, window_ms=32.0, hop_ms=16.0),
    ],
    ids=["16k-0.5s", "16k-1s", "16k-0.73s-25ms", "8k-1s", "16k-1s-32ms-16ms"],
)
def test_fir_front_end_yields_as_many_frames_as_the_log_mel_front_end(features):
    waveform = torch.zeros(2, features.clip_samples)
    with torch.no_grad():
        fir = FIRFilterBank(features)(waveform)
        log_mel = FrontEnd(features)(waveform)
    assert fir.shape == log_mel.shape == (2, 40, features.num_frames(features.clip_samples))


@pytest.mark.parametrize("mode", ["mean", "meanvar"])
def test_fir_front_end_normalises_each_band_over_the_clip_as_the_log_mel_front_end_does(mode, noise):
    waveform = torch.from_numpy(np.stack([noise(1.0, seed=seed) for seed in range(2)]))
    plain = FIRFilterBank(FeatureConfig())
    normalised = FIRFilterBank(FeatureConfig(normalization=mode))
    normalised.load_state_dict(plain.state_dict())
    with torch.no_grad():
        raw, result = plain(waveform), normalised(waveform)
    torch.testing.assert_close(result, FrontEnd(FeatureConfig(normalization=mode)).normalize(raw))
    torch.testing.assert_close(result.mean(dim=-1), torch.zeros(2, 40), atol=1e-4, rtol=0)


def test_build_model_turns_json_lists_into_tuples(monkeypatch):
    received = {}

    class Recorder(torch.nn.Module):
        def __init__(self, num_classes, features, **arguments):
            super().__init__()
            received.update(arguments)

    monkeypatch.setitem(kws.models.ARCHITECTURES, "recorder", Recorder)
    build_model("recorder", {"widths": [8, 12], "pools": [[2, 2], [1, 1]], "dropout": 0.1}, 3, FEATURES)
    assert received == {"widths": (8, 12), "pools": ((2, 2), (1, 1)), "dropout": 0.1}
    assert type(received["widths"]) is tuple and type(received["pools"][0]) is tuple


def test_a_model_built_from_json_arguments_equals_the_one_built_from_the_preset(waveforms):
    architecture, arguments = ModelConfig(name="resnet_tiny").architecture()
    from_json = json.loads(json.dumps({**arguments, "pools": ((2, 2), (2, 2), (2, 2), (1, 1))}))
    torch.manual_seed(0)
    original = build_model(architecture, arguments, 4, FEATURES).eval()
    torch.manual_seed(0)
    rebuilt = build_model(architecture, from_json, 4, FEATURES).eval()
    with torch.no_grad():
        assert torch.equal(original(waveforms), rebuilt(waveforms))


def test_build_model_refuses_an_unknown_architecture():
    with pytest.raises(ConfigError, match="transformer"):
        build_model("transformer", {}, 3, FEATURES)


def test_model_config_passes_dropout_to_every_model_and_the_fir_initialisation_to_firnet_only():
    assert ModelConfig(name="resnet_tiny", dropout=0.1).architecture() == (
        "resnet",
        {"widths": (8, 12, 16, 24), "stem_pool": (2, 1), "dropout": 0.1},
    )
    architecture, arguments = ModelConfig(name="firnet_small", fir_init="random").architecture()
    assert architecture == "firnet" and arguments["init"] == "random" and arguments["dropout"] == 0.3
    assert ModelConfig(name="firnet").architecture() == ("firnet", {"dropout": 0.3, "init": "mel"})
    model = build_model(*ModelConfig(name="firnet_small", dropout=0.2).architecture(), 3, FEATURES)
    assert isinstance(model, KeywordFIRNet) and model.dropout.p == 0.2
    assert isinstance(build_model(*ModelConfig(name="resnet").architecture(), 3, FEATURES), KeywordResNet)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"name": "resnet_huge"}, "model.name"),
        ({"dropout": 1.0}, "model.dropout"),
        ({"dropout": -0.1}, "model.dropout"),
        ({"fir_init": "zeros"}, "model.fir_init"),
        ({"depth": 3}, "model.depth"),
        ({"dropout": "high"}, "model.dropout"),
    ],
)
def test_model_config_refuses_bad_settings_naming_the_key(values, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build(ModelConfig, values, "model")


@pytest.mark.parametrize("name", ["resnet_tiny", "firnet_small"])
def test_the_inference_copy_gives_the_models_outputs_for_any_batch_size(name):
    torch.manual_seed(0)
    architecture, arguments = ModelConfig(name).architecture()
    features = FeatureConfig(clip_s=0.5)
    model = build_model(architecture, arguments, 4, features).eval()
    fast = optimize_for_inference(model, features.clip_samples)
    for batch in (1, 5):
        waveforms = 0.1 * torch.randn(batch, features.clip_samples)
        with torch.no_grad():
            torch.testing.assert_close(fast(waveforms), model(waveforms), rtol=1e-4, atol=1e-4)


MIXED_PRECISION = [("cpu", torch.bfloat16)] + ([("cuda", torch.float16)] if torch.cuda.is_available() else [])


@pytest.mark.parametrize(("device", "dtype"), MIXED_PRECISION)
@pytest.mark.parametrize("front_end", ["logmel", "mfcc", "fir"])
def test_front_ends_compute_in_float32_under_mixed_precision(device, dtype, front_end):
    # Loud enough that a float16 power spectrum would overflow, with a near-silent second clip.
    generator = torch.Generator().manual_seed(0)
    loud = torch.sin(torch.arange(16000) * 0.3) * 0.99 + 0.01 * torch.randn(16000, generator=generator)
    waveforms = torch.stack([loud, loud * 1e-4]).to(device)
    if front_end == "fir":
        module = FIRFilterBank(FeatureConfig()).to(device)
    else:
        module = FrontEnd(FeatureConfig(kind=front_end)).to(device)

    plain = module(waveforms)
    with torch.autocast(device, dtype=dtype):
        mixed = module(waveforms)

    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, plain)
