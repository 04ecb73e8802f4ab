"""The one checkpoint format: safetensors weights plus a JSON description, never pickle.

A checkpoint says everything inference needs (architecture and its arguments, FeatureConfig,
labels) and how it was made (recipe, metrics), so a model is loaded from its file alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from kws.config import FeatureConfig
from kws.errors import KWSError, ModelError
from kws.models import build_model
from kws.settings import build

FORMAT_VERSION = 1


def _shipped_models() -> Path:
    """Where the shipped models are: inside the installed package (kws/shipped_models, which
    pyproject.toml maps from models/), or models/ beside the package in a source checkout."""
    package = Path(__file__).resolve().parent
    installed = package / "shipped_models"
    return installed if installed.is_dir() else package.parent / "models"


SHIPPED_MODELS = _shipped_models()


@dataclass(frozen=True)
class ModelInfo:
    """What a checkpoint says about its model."""

    architecture: str
    arguments: dict
    features: FeatureConfig
    labels: tuple[str, ...]
    recipe: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    card: dict = field(default_factory=dict)  # how it was made and measured (kws.card)
    format: int = FORMAT_VERSION

    def to_json(self) -> str:
        values = {
            "format": self.format,
            "architecture": self.architecture,
            "arguments": self.arguments,
            "features": self.features.to_dict(),
            "labels": list(self.labels),
            "sample_rate": self.features.sample_rate,
            "recipe": self.recipe,
            "metrics": self.metrics,
            "card": self.card,
        }
        return json.dumps(values, default=_jsonable)


def _jsonable(value: object) -> object:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    info: ModelInfo,
    extra: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write weights (and `extra` tensors and `metadata` strings, e.g. a run's optimiser state) atomically:
    a crash leaves the old file."""
    tensors = {f"model.{name}": tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    for name, tensor in (extra or {}).items():
        tensors[f"extra.{name}"] = tensor.detach().cpu().contiguous()
    _write(Path(path), tensors, info, metadata)


def rewrite_info(path: str | os.PathLike, info: ModelInfo) -> None:
    """Replace a checkpoint's description (e.g. to add its card), keeping every tensor; atomic."""
    path = resolve_model_path(path)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    _write(path, tensors, info)


def _write(path: Path, tensors: dict[str, torch.Tensor], info: ModelInfo, metadata: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        save_file(tensors, str(partial), metadata={**(metadata or {}), "kws": info.to_json()})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A path to a checkpoint, or the name of a shipped model in models/ (e.g. `speech_commands`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = SHIPPED_MODELS / f"{name_or_path}.safetensors"
    if shipped.is_file():
        return shipped
    if path.is_dir() and (path / "best.safetensors").is_file():
        return path / "best.safetensors"
    raise ModelError(f"{name_or_path}: no such model file, run folder, or shipped model")


def read_info(path: str | os.PathLike) -> ModelInfo:
    path = resolve_model_path(path)
    try:
        metadata = _stored_metadata(path)
    except (SafetensorError, OSError) as error:
        raise ModelError(f"{path}: not a readable checkpoint ({error})") from None
    if "kws" not in metadata:
        raise ModelError(f"{path}: a safetensors file without kws metadata, not a kws model")
    try:
        values = json.loads(metadata["kws"])
    except json.JSONDecodeError as error:
        raise ModelError(f"{path}: damaged kws description ({error.msg})") from None
    if values.get("format") != FORMAT_VERSION:
        raise ModelError(f"{path}: checkpoint format {values.get('format')} is not {FORMAT_VERSION}")
    missing = [key for key in ("architecture", "arguments", "features", "labels") if key not in values]
    if missing:
        raise ModelError(f"{path}: the kws description lacks {', '.join(missing)}; not a complete kws model")
    try:
        features = build(FeatureConfig, values["features"], "features")
    except KWSError as error:
        raise ModelError(f"{path}: {error}") from None
    if not isinstance(values["arguments"], dict) or not isinstance(values["labels"], list):
        raise ModelError(f"{path}: damaged kws description (arguments or labels of the wrong type)")
    return ModelInfo(
        values["architecture"],
        values["arguments"],
        features,
        tuple(values["labels"]),
        values.get("recipe", {}),
        values.get("metrics", {}),
        values.get("card", {}),
    )


def _stored_metadata(path: Path) -> dict[str, str]:
    """A model file's string metadata: a safetensors header's, or an exported ONNX graph's (kws export)."""
    if path.suffix == ".onnx":
        from kws.onnx_model import onnx_metadata

        return onnx_metadata(path)
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def read_tensors(path: str | os.PathLike, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors stored under `prefix.` (e.g. "model" or "extra"), with the prefix removed."""
    path = resolve_model_path(path)
    with safe_open(str(path), framework="pt") as handle:
        return {key[len(prefix) + 1 :]: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix + ".")}


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
    """Build the model a checkpoint describes, load its weights, and return it in eval mode; an exported
    .onnx file gives a model run by onnxruntime (kws.onnx_model), called the same way."""
    path = resolve_model_path(name_or_path)
    info = read_info(path)
    if path.suffix == ".onnx":
        from kws.onnx_model import OnnxModel

        return OnnxModel(path).to(device).eval(), info
    try:
        model = build_model(info.architecture, info.arguments, len(info.labels), info.features)
    except (KWSError, TypeError, ValueError) as error:
        raise ModelError(f"{path}: cannot build the described {info.architecture} model ({error})") from None
    try:
        model.load_state_dict(read_tensors(path, "model"))
    except RuntimeError as error:
        problem = " ".join(str(error).split())  # torch's message spans several lines
        raise ModelError(f"{path}: weights do not fit the described model ({problem[:200]})") from None
    return model.to(device).eval(), info
