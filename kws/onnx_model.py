"""Exported models (`kws export`, an .onnx file) run by onnxruntime, called as the PyTorch models are.

onnxruntime is optional (`pip install kws[onnx]`) and imported only when an .onnx model is loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kws.errors import ModelError

ONNX_SUFFIX = ".onnx"
INPUT_NAME, OUTPUT_NAME = "waveform", "logits"
DESCRIPTION_KEY = "kws"  # the same JSON description as a safetensors checkpoint's
EXPORT_KEY = "kws_export"  # how it was exported, and what only the PyTorch model could count
INSTALL_HINT = "pip install kws[onnx]"
BATCH = 16  # windows per onnxruntime call


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ModelError(f"an .onnx model runs on onnxruntime, which is not installed: {INSTALL_HINT}") from None
    return onnxruntime


def _session(path: Path, threads: int, optimize: bool = True):
    onnxruntime = import_onnxruntime()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Threads that spin between calls take the CPU from the threads that read the next files.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types, not exported under stable names
        raise ModelError(f"{path}: not a readable ONNX model ({str(error).splitlines()[0][:200]})") from None


def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of an .onnx file (`kws`: the model's description, as in a checkpoint)."""
    return dict(_session(Path(path), 1, optimize=False).get_modelmeta().custom_metadata_map)


class OnnxModel(nn.Module):
    """An exported model: (batch, samples) float32 waveforms -> (batch, classes) logits, on the CPU.

    It runs on as many threads as torch is set to (`torch.set_num_threads`), one onnxruntime session
    per thread count; it has no layers or parameters of its own, so only inference works with it.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(path)
        self._sessions: dict[int, object] = {}
        self.export = json.loads(onnx_metadata(self.path).get(EXPORT_KEY, "{}"))

    @property
    def parameter_count(self) -> int:
        """Parameters of the PyTorch model it was exported from."""
        return int(self.export.get("parameters", 0))

    def session(self):
        threads = torch.get_num_threads()
        if threads not in self._sessions:
            self._sessions[threads] = _session(self.path, threads)
        return self._sessions[threads]

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        samples = waveform.detach().to("cpu", torch.float32).contiguous().numpy()
        session = self.session()
        # In parts small enough for the front end's intermediates to stay in cache (measured fastest).
        logits = [session.run([OUTPUT_NAME], {INPUT_NAME: samples[start : start + BATCH]})[0]
                  for start in range(0, len(samples), BATCH)]  # fmt: skip
        return torch.from_numpy(np.concatenate(logits)).to(waveform.device)


def require_layers(model: nn.Module, purpose: str) -> None:
    """A `ModelError` when `model` is an exported graph: `purpose` needs the PyTorch model's layers."""
    if isinstance(model, OnnxModel):
        raise ModelError(
            f"{model.path}: {purpose} needs the PyTorch model's layers, which an exported .onnx model does not "
            "have; give the .safetensors model it was exported from"
        )
