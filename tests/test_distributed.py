"""Training on two processes under torchrun (gloo, CPU): one model, resumable, close to one process's run.

Each launch starts two Python processes, so these tests take some seconds each.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kws.checkpoint import read_info
from kws.config import load_recipe
from kws.distributed import Processes
from kws.train import train

INTERRUPTED_AFTER_EPOCH_1 = """
import sys
from pathlib import Path
from kws.config import load_recipe
from kws.distributed import Processes
from kws.train import train

def interrupt(record, is_best):
    raise KeyboardInterrupt

run_dir = Path(sys.argv[2])
train(load_recipe(sys.argv[1]), run_dir, device="cpu", cache_root=run_dir.parent / "features", on_epoch=interrupt,
      processes=Processes.join())
"""


def torchrun(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 ARGUMENTS` (one thread each), from `tmp_path`."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run([*command, *arguments], cwd=tmp_path, env=environment, capture_output=True, text=True)


def interrupted_after_epoch_1(tmp_path: Path, recipe_path: Path, out: str) -> subprocess.CompletedProcess:
    """A two-process run stopped by KeyboardInterrupt in both processes once epoch 1 is written."""
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED_AFTER_EPOCH_1)
    return torchrun(tmp_path, str(script), str(recipe_path), out)


def history(run_dir: Path) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "seconds"}
            for row in json.loads((run_dir / "metrics.json").read_text())]  # fmt: skip


def model_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in load_file(str(path)).items() if name.startswith("model.")}


def test_one_process_is_the_single_process_default():
    assert Processes.join({}) == Processes() and Processes().main and Processes().world == 1
    batch = torch.arange(5)
    assert torch.equal(Processes().shard(batch), batch)
    assert [Processes(rank, 2).shard(batch).tolist() for rank in (0, 1)] == [[0, 2, 4], [1, 3]]


def test_two_processes_train_one_model_close_to_one_process_and_resume_exactly(recipe_path, tmp_path):
    single = train(load_recipe(recipe_path), tmp_path / "single", device="cpu", cache_root=tmp_path / "features")

    result = torchrun(tmp_path, "-m", "kws", "train", str(recipe_path), "--out", "two", "--device", "cpu",
                      "--cache", "features")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "2 processes train together" in result.stderr and "best validation accuracy" in result.stderr
    two = tmp_path / "two"
    epochs = history(two)
    assert [row["epoch"] for row in epochs] == [1, 2, 3]
    # The same schedule over the same global batches; the losses differ only by what each process's
    # BatchNorm and augmentation saw.
    assert [row["learning_rate"] for row in epochs] == pytest.approx([r.learning_rate for r in single.history])
    assert epochs[0]["train_loss"] == pytest.approx(single.history[0].train_loss, rel=0.15)
    assert epochs[-1]["validation_accuracy"] >= 0.7 and single.history[-1].validation_accuracy >= 0.7
    card = read_info(two / "best.safetensors").card
    assert card["training"]["processes"] == 2

    interrupted = interrupted_after_epoch_1(tmp_path, recipe_path, "resumed")
    assert interrupted.returncode != 0 and [row["epoch"] for row in history(tmp_path / "resumed")] == [1]
    resumed = torchrun(tmp_path, "-m", "kws", "train", str(recipe_path), "--out", "resumed", "--device", "cpu",
                       "--cache", "features", "--resume")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert history(tmp_path / "resumed") == epochs
    for name in ("best.safetensors", "state.safetensors"):
        first, second = model_tensors(two / name), model_tensors(tmp_path / "resumed" / name)
        assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def test_a_two_process_run_resumed_on_one_process_is_refused(recipe_path, tmp_path):
    result = interrupted_after_epoch_1(tmp_path, recipe_path, "run")
    assert result.returncode != 0
    with pytest.raises(Exception, match="began on 2 process"):
        train(load_recipe(recipe_path), tmp_path / "run", device="cpu", cache_root=tmp_path / "features", resume=True)
