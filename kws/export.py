"""`kws export`: a model as one ONNX graph, waveform in and logits out, its front end inside, its description
in the file's metadata; optionally quantized to int8 by onnxruntime, calibrated on training clips.

The graph takes (batch, samples) float32 waveforms at the model's sample rate, `samples` its window
(`clip_s`), and any batch size; it returns (batch, classes) logits, softmax not applied. The metadata
key `kws` holds the same JSON description as a safetensors checkpoint (labels, feature settings, recipe,
card with the calibrated detector), so `kws.checkpoint.read_info` reads both; `kws_export` says how it
was exported. Needs `onnx` and `onnxruntime` (pip install kws[onnx]).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kws import __version__
from kws.card import count_macs
from kws.checkpoint import ModelInfo, load_model, resolve_model_path
from kws.errors import DataError, ModelError
from kws.models import count_parameters
from kws.onnx_model import (
    DESCRIPTION_KEY,
    EXPORT_KEY,
    INPUT_NAME,
    INSTALL_HINT,
    OUTPUT_NAME,
    OnnxModel,
    import_onnxruntime,
)

OPSET = 20
CALIBRATION_SPLIT = "training"
QUANTIZED_OPS = ("Conv", "Gemm")  # the network; the front end (framing, DFT, mel, log) stays float32
CALIBRATION_BATCH = 32


@dataclass(frozen=True)
class ExportReport:
    """What was written: the file, its size, and how closely onnxruntime reproduces the PyTorch model."""

    path: Path
    size_bytes: int
    int8: bool
    max_logit_difference: float  # onnxruntime against PyTorch on made-up audio (float32 export only)
    calibration_clips: int = 0
    quantized_nodes: int = 0


def import_onnx():
    """The onnx package, checked to be there with onnxscript (torch.onnx's exporter needs both)."""
    try:
        import onnx
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ModelError(f"exporting needs the {error.name} package: {INSTALL_HINT}") from None
    return onnx


def export_model(
    name_or_path: str | os.PathLike,
    out: str | os.PathLike,
    int8: bool = False,
    data: str | os.PathLike | None = None,
    calibration_clips: int = 300,
    workers: int | None = None,
    on_step: Callable[[str], None] | None = None,
) -> ExportReport:
    """Write the model as ONNX to `out`, checked with `onnx.checker`; with `int8`, quantized statically
    (QDQ, per-channel weights), calibrated on `calibration_clips` clips of `data`'s training split."""
    step = on_step or (lambda text: None)
    onnx = import_onnx()
    import_onnxruntime()
    out = Path(out)
    if out.suffix != ".onnx":
        raise ModelError(f"{out}: the exported file's name must end in .onnx")
    if int8 and data is None:
        raise DataError("--int8 calibrates on training clips: give the dataset with --data")
    if resolve_model_path(name_or_path).suffix == ".onnx":
        raise ModelError(f"{name_or_path}: already an exported .onnx model; export the .safetensors model")
    model, info = load_model(name_or_path)
    samples = info.features.clip_samples
    export_facts = {
        "source": str(name_or_path),
        "kws": __version__,
        "torch": torch.__version__,
        "opset": OPSET,
        "parameters": count_parameters(model),
        "macs_per_window": count_macs(model, samples),
        "input": f"{INPUT_NAME}: (batch, {samples}) float32 at {info.features.sample_rate} Hz",
        "output": f"{OUTPUT_NAME}: (batch, {len(info.labels)}) in the order of labels",
    }
    with tempfile.TemporaryDirectory(prefix="kws-export-") as folder:
        float_path = Path(folder) / "float32.onnx"
        step("exporting the graph")
        _export_graph(model, samples, float_path)
        difference = _largest_logit_difference(model, float_path, samples, info.features.sample_rate)
        calibrated = quantized_nodes = 0
        if int8:
            step(f"calibrating int8 on {calibration_clips} {CALIBRATION_SPLIT} clips of {data}")
            waveforms = calibration_waveforms(info, Path(data), calibration_clips, workers)
            quantized_path = Path(folder) / "int8.onnx"
            quantized_nodes = _quantize(float_path, quantized_path, waveforms)
            calibrated = len(waveforms)
            export_facts["int8"] = {
                "calibration": {"data": str(data), "split": CALIBRATION_SPLIT, "clips": calibrated},
                "quantized": f"{quantized_nodes} {' and '.join(QUANTIZED_OPS)} nodes of the network (static, QDQ, "
                "per-channel weights, unsigned 8-bit activations); the front end stays float32",
            }
        graph = onnx.load(str(quantized_path if int8 else float_path))
    _write(graph, info, export_facts, out)
    return ExportReport(out, out.stat().st_size, int8, difference, calibrated, quantized_nodes)


def _export_graph(model: torch.nn.Module, samples: int, path: Path) -> None:
    """torch.onnx's exporter, its progress lines and notes kept off stdout (kws's output for programs)."""
    example = torch.zeros(2, samples)
    batch = torch.export.Dim("batch", min=1)
    with (
        contextlib.redirect_stdout(io.StringIO()),
        warnings.catch_warnings(),
        _quiet_logger("torch.onnx"),
        _quiet_logger("torch.export"),
        torch.no_grad(),
    ):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes={"waveform": {0: batch}}, opset_version=OPSET, dynamo=True, verbose=False,
        )  # fmt: skip


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _write(graph, info: ModelInfo, export_facts: dict, out: Path) -> None:
    """Store the description (as a checkpoint holds it) and the export facts in the graph's metadata, drop
    the exporter's notes on each node (a third of the file), check the graph and write it atomically."""
    onnx = import_onnx()
    for key, value in ((DESCRIPTION_KEY, info.to_json()), (EXPORT_KEY, json.dumps(export_facts))):
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    graph.producer_name, graph.producer_version = "kws", __version__
    for node in graph.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        onnx.save(graph, str(partial))
        try:
            onnx.checker.check_model(str(partial), full_check=True)
        except onnx.checker.ValidationError as error:
            raise ModelError(f"the exported graph fails onnx.checker: {str(error).splitlines()[0]}") from None
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)


def _largest_logit_difference(model: torch.nn.Module, path: Path, samples: int, sample_rate: int) -> float:
    """Largest |logit| difference between onnxruntime and PyTorch over made-up audio: silence, noise at
    three levels and a tone, as a batch of five."""
    generator = torch.Generator().manual_seed(0)
    time_s = torch.arange(samples) / sample_rate
    batch = torch.stack([
        torch.zeros(samples),
        *(level * torch.randn(samples, generator=generator) for level in (0.001, 0.03, 0.3)),
        0.5 * torch.sin(2 * torch.pi * 440 * time_s),
    ])  # fmt: skip
    with torch.no_grad():
        expected = model(batch)
    return float((OnnxModel(path)(batch) - expected).abs().max())


def calibration_waveforms(info: ModelInfo, data: Path, count: int, workers: int | None = None) -> np.ndarray:
    """`count` clips of the model's classes spread evenly over `data`'s training split, as training hears
    them (resampled, padded or cut to the window): (clips, samples) float32."""
    from kws.card import data_config
    from kws.data import load_dataset
    from kws.extract import load_clips

    clips = load_dataset(data_config(info), data).split(CALIBRATION_SPLIT)
    if not clips:
        raise DataError(f"{data}: no {CALIBRATION_SPLIT} clips to calibrate int8 on")
    chosen = [clips[round(index * len(clips) / count)] for index in range(min(count, len(clips)))]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        waveforms = [waveform for _, waveform in load_clips(pool, chosen, info.features)
                     if not isinstance(waveform, str)]  # fmt: skip
    if not waveforms:
        raise DataError(f"{data}: none of the {CALIBRATION_SPLIT} clips chosen to calibrate on could be read")
    return np.stack(waveforms).astype(np.float32)


def _quantize(float_path: Path, out: Path, waveforms: np.ndarray) -> int:
    """Static int8 quantization of the network's Conv and Gemm nodes; returns how many were quantized."""
    import_onnxruntime()
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    onnx = import_onnx()

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.parts = iter(np.array_split(waveforms, max(1, len(waveforms) // CALIBRATION_BATCH)))

        def get_next(self) -> dict | None:
            part = next(self.parts, None)
            return None if part is None else {INPUT_NAME: part}

    graph = onnx.load(str(float_path))
    front_end = [node.name for node in graph.graph.node if _in_front_end(node)]
    network = [node.name for node in graph.graph.node if node.op_type in QUANTIZED_OPS and node.name not in front_end]
    with warnings.catch_warnings(), _quiet_logger("root"):
        warnings.simplefilter("ignore")
        quantize_static(
            str(float_path), str(out), Batches(), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_exclude=front_end, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )  # fmt: skip
    return len(network)


def _in_front_end(node) -> bool:
    """Whether torch.onnx placed a node inside the model's `front_end` module (its name scopes say)."""
    scopes = next((prop.value for prop in node.metadata_props if prop.key == "pkg.torch.onnx.name_scopes"), "")
    return "'front_end'" in scopes
