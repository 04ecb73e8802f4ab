"""`kws export`: the ONNX graph passes onnx.checker, takes any batch size, gives PyTorch's logits on
onnxruntime, carries the model's description, and runs wherever a MODEL is taken; int8 quantizes only the
network; commands that need a PyTorch model's layers say so in one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kws.checkpoint import ModelInfo, load_model, read_info, save_checkpoint
from kws.cli import app
from kws.config import FeatureConfig, ModelConfig
from kws.errors import ModelError
from kws.export import export_model
from kws.features import FrontEnd, MatrixSpectrum
from kws.models import build_model, count_parameters, predict_probabilities
from kws.onnx_model import OnnxModel
from kws.stream_test import make_stream_test

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

REPO_ROOT = Path(__file__).resolve().parents[1]
RATE = 16000
FEATURES = FeatureConfig(clip_s=0.5, n_mels=32, f_max=7600.0)
LABELS = ("_silence_", "_unknown_", "yes", "no")


def run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    return result.exit_code, result.stdout, re.sub(r"\x1b\[[0-9;]*m", "", result.stderr)


def untrained(preset: str, path: Path, features: FeatureConfig = FEATURES) -> Path:
    """An untrained model whose BatchNorm statistics have moved, so its outputs differ from clip to clip."""
    torch.manual_seed(0)
    architecture, arguments = ModelConfig(name=preset).architecture()
    model = build_model(architecture, arguments, len(LABELS), features).train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for scale in (0.3, 0.03, 0.1):
            model(scale * torch.randn(4, features.clip_samples, generator=generator))
    recipe = {"data": {"words": ["yes", "no"]}}
    save_checkpoint(path, model.eval(), ModelInfo(architecture, arguments, features, LABELS, recipe))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(safetensors, onnx) of an untrained resnet_tiny."""
    folder = tmp_path_factory.mktemp("tiny")
    source = untrained("resnet_tiny", folder / "tiny.safetensors")
    return source, export_model(source, folder / "tiny.onnx").path


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Path:
    """The shipped speech_commands model, exported."""
    return export_model("speech_commands", tmp_path_factory.mktemp("shipped") / "speech_commands.onnx").path


def made_up_audio(samples: int, rate: int = RATE) -> torch.Tensor:
    """Silence, noise at three levels, a tone, a chirp and a click: (7, samples)."""
    generator = torch.Generator().manual_seed(1)
    time_s = torch.arange(samples) / rate
    click = torch.zeros(samples)
    click[samples // 3] = 0.9
    return torch.stack([
        torch.zeros(samples),
        *(level * torch.randn(samples, generator=generator) for level in (1e-4, 0.02, 0.5)),
        0.3 * torch.sin(2 * torch.pi * 440 * time_s),
        0.3 * torch.sin(2 * torch.pi * (200 + 1500 * time_s) * time_s),
        click,
    ])  # fmt: skip


@pytest.mark.parametrize(
    "config",
    [FeatureConfig(), FeatureConfig(sample_rate=8000), FeatureConfig(kind="stft"), FeatureConfig(n_fft=1024)],
    ids=["16k", "8k", "stft", "n_fft-1024"],
)
def test_the_exported_spectrum_equals_numpys_fft_of_the_windowed_frames(config):
    waveform = made_up_audio(config.clip_samples, config.sample_rate)
    front_end = FrontEnd(config)
    padded = torch.nn.functional.pad(waveform, (config.fft_size // 2, config.fft_size // 2))
    frames = padded.unfold(-1, config.fft_size, config.hop_length).double().numpy() * front_end.window.double().numpy()
    expected = np.abs(np.fft.rfft(frames)) ** 2

    assert MatrixSpectrum.factors(config) is not None
    power = front_end.exported_spectrum(padded).double().numpy()

    np.testing.assert_allclose(power, expected, rtol=1e-4, atol=1e-6 * expected.max())


@pytest.mark.parametrize("preset", ["resnet_tiny", "firnet_small"])
def test_onnxruntime_gives_pytorchs_logits_for_any_batch_size(preset, tmp_path):
    source = untrained(preset, tmp_path / f"{preset}.safetensors")
    report = export_model(source, tmp_path / f"{preset}.onnx")
    model, _ = load_model(source)
    audio = made_up_audio(FEATURES.clip_samples)
    with torch.no_grad():
        expected = model(audio).numpy()

    session = onnxruntime.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    for batch in (1, 3, len(audio)):
        (logits,) = session.run(None, {"waveform": audio[:batch].numpy()})
        np.testing.assert_allclose(logits, expected[:batch], atol=1e-4 * max(1.0, np.abs(expected).max()))
    assert report.max_logit_difference < 1e-3
    assert isinstance(session.get_inputs()[0].shape[0], str)  # the batch dimension is named, not fixed


def test_the_exported_file_passes_onnx_checker_and_holds_the_checkpoints_description(tiny):
    source, exported = tiny
    onnx.checker.check_model(str(exported), full_check=True)
    metadata = {entry.key: entry.value for entry in onnx.load(str(exported)).metadata_props}

    assert read_info(exported) == read_info(source)
    assert json.loads(metadata["kws"])["labels"] == list(LABELS)
    assert json.loads(metadata["kws_export"])["parameters"] == count_parameters(load_model(source)[0])


def test_load_model_runs_an_onnx_file_as_the_pytorch_model_runs(tiny):
    source, exported = tiny
    torch_model, _ = load_model(source)
    onnx_model, info = load_model(exported)
    audio = made_up_audio(info.features.clip_samples)

    assert isinstance(onnx_model, OnnxModel)
    np.testing.assert_allclose(predict_probabilities(onnx_model, audio, batch_size=3),
                               predict_probabilities(torch_model, audio), atol=1e-5)  # fmt: skip
    assert count_parameters(onnx_model) == count_parameters(torch_model)


def test_classify_gives_the_same_labels_on_the_onnx_file(tiny, tmp_path, write_wav, tone, chirp, noise):
    source, exported = tiny
    write_wav(tmp_path / "clips" / "tone.wav", tone(440, 0.3), RATE)
    write_wav(tmp_path / "clips" / "chirp.wav", chirp(300, 5000, 0.5), RATE)
    write_wav(tmp_path / "clips" / "noise_8k.wav", noise(0.4, rate=8000), 8000)
    write_wav(tmp_path / "clips" / "long.wav", np.concatenate([noise(1.0, rms=0.01), tone(900, 0.4)]), RATE)

    rows = {}
    for model in (source, exported):
        code, stdout, stderr = run("classify", tmp_path / "clips", "--model", model, "--format", "jsonl", "--top-k=4")
        assert code == 0, stderr
        rows[model] = [json.loads(line) for line in stdout.splitlines()]

    for ours, theirs in zip(rows[exported], rows[source], strict=True):
        assert (ours["path"], ours["label"], ours["windows"], ours["start_s"]) == (
            theirs["path"], theirs["label"], theirs["windows"], theirs["start_s"]
        )  # fmt: skip
        assert ours["score"] == pytest.approx(theirs["score"], abs=1e-5)


def test_int8_quantizes_the_network_and_leaves_the_front_end_in_float32(tiny, words_folder, tmp_path):
    source, exported = tiny
    report = export_model(source, tmp_path / "int8.onnx", int8=True, data=words_folder, calibration_clips=8)
    graph = onnx.load(str(report.path)).graph
    onnx.checker.check_model(str(report.path), full_check=True)
    consumers = [node.op_type for node in graph.node if "waveform" in node.input]
    facts = json.loads({entry.key: entry.value for entry in onnx.load(str(report.path)).metadata_props}["kws_export"])

    assert report.int8 and report.calibration_clips == 8
    conv_and_gemm = sum(node.op_type in ("Conv", "Gemm") for node in onnx.load(str(exported)).graph.node)
    assert report.quantized_nodes == conv_and_gemm  # resnet_tiny: every Conv and Gemm is in the network
    assert sum(node.op_type == "QuantizeLinear" for node in graph.node) > 0
    assert "QuantizeLinear" not in consumers  # the waveform itself is never quantized
    assert facts["int8"]["calibration"] == {"data": str(words_folder), "split": "training", "clips": 8}
    assert read_info(report.path) == read_info(source)
    onnx_model, _ = load_model(report.path)
    assert predict_probabilities(onnx_model, made_up_audio(FEATURES.clip_samples)).shape == (7, len(LABELS))


def test_export_errors_are_one_line(tiny, tmp_path):
    source, exported = tiny
    for args, message in (
        (("export", exported, "--out", tmp_path / "again.onnx"), "already an exported .onnx model"),
        (("export", source, "--out", tmp_path / "model.bin"), "must end in .onnx"),
        (("export", source, "--out", tmp_path / "int8.onnx", "--int8"), "give the dataset with --data"),
    ):
        code, _, stderr = run(*args)
        assert code == 2 and message in stderr and "Traceback" not in stderr


def test_commands_that_need_the_pytorch_layers_say_so_in_one_line(tiny, tmp_path, write_wav, tone):
    _, exported = tiny
    wav = write_wav(tmp_path / "tone.wav", tone(440, 0.5), RATE)
    for args in (("viz", "features", wav, "--model", exported), ("viz", "filters", exported)):
        code, _, stderr = run(*args)
        assert code == 2 and "needs the PyTorch model's layers" in stderr and len(stderr.strip().splitlines()) == 1
    code, _, stderr = run("card", exported, "--data", tmp_path, "--write")
    assert code == 2 and "error:" in stderr


def test_a_missing_onnxruntime_names_the_extra_to_install(tiny, monkeypatch):
    _, exported = tiny
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ModelError, match=re.escape("pip install kws[onnx]")):
        load_model(exported)


@pytest.mark.parametrize("package", ["onnx", "onnxscript", "onnxruntime"])
def test_exporting_without_a_package_of_the_extra_names_it(package, tiny, tmp_path, monkeypatch):
    source, _ = tiny
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(ModelError, match=re.escape("pip install kws[onnx]")):
        export_model(source, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_a_shipped_model_classifies_and_streams_the_same_on_onnxruntime(shipped, shared_data, tmp_path):
    clips = sorted((shared_data / "speech_commands" / "left").glob("*.wav"))[:40]
    labels = {}
    for model in ("speech_commands", shipped):
        code, stdout, stderr = run("classify", *clips, "--model", model, "--format", "jsonl")
        assert code == 0, stderr
        labels[model] = [(row["label"], row["score"]) for row in map(json.loads, stdout.splitlines())]
    assert [label for label, _ in labels[shipped]] == [label for label, _ in labels["speech_commands"]]
    np.testing.assert_allclose([s for _, s in labels[shipped]], [s for _, s in labels["speech_commands"]], atol=1e-4)

    test = make_stream_test(shared_data / "speech_commands", tmp_path / "stream.wav", split="testing", max_words=30)
    events = {}
    for model in ("speech_commands", shipped):
        code, stdout, stderr = run("stream", test.wav, "--model", model)
        assert code == 0, stderr
        events[model] = [json.loads(line) for line in stdout.splitlines()]
    assert events["speech_commands"], "the stream test should hold detections to compare"
    assert [(e["time_s"], e["keyword"]) for e in events[shipped]] == [
        (e["time_s"], e["keyword"]) for e in events["speech_commands"]
    ]


def test_the_readme_example_runs_an_exported_model_without_importing_torch(shipped, shared_data, tmp_path):
    text = (REPO_ROOT / "README.md").read_text()
    [example] = re.findall(r"^```python without-torch\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(shared_data)
    work = tmp_path / "kws"
    work.mkdir()
    (work / "speech_commands.onnx").symlink_to(shipped)
    check = "\nimport sys\nassert 'torch' not in sys.modules, 'the example imported torch'\n"

    result = subprocess.run([sys.executable, "-c", example + check], cwd=work, capture_output=True, text=True,
                            timeout=120)  # fmt: skip

    assert result.returncode == 0, result.stderr
    label, probability = result.stdout.split()
    assert label == "yes" and 0.5 < float(probability) <= 1.0
