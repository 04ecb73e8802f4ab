"""Training: run folders, learning, determinism, resuming, starting from a model, class balance,
the learning-rate schedule, augmentation, and `kws train`.

Every run trains resnet_tiny for a few epochs on half-second clips of made-up words (tones and a
chirp), so each takes about a second.
"""

import dataclasses
import json
import math
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import kws.train
from kws.checkpoint import ModelInfo, load_model, read_info, save_checkpoint
from kws.cli import app
from kws.config import AugmentConfig, TrainConfig, load_recipe
from kws.data import load_clip, load_dataset
from kws.errors import ConfigError, KWSError
from kws.extract import WaveformStore, append_waveforms
from kws.models import build_model
from kws.train import (
    Augmenter,
    HardestWindows,
    NegativeSpeech,
    SplitData,
    TrainResult,
    class_sampling_weights,
    cosine_with_warmup,
    distillation_loss,
    draw_batch,
    epoch_order,
    fft_convolve,
    initialise_from,
    mixup,
    room_response,
    teacher_probabilities,
    train,
)

LABELS = ("_silence_", "_unknown_", "yes", "no")


def run_training(recipe_path: Path, run_dir: Path, *overrides: str, **options) -> TrainResult:
    """Train on the CPU, keeping feature caches next to the run folder."""
    recipe = load_recipe(recipe_path, list(overrides))
    return train(recipe, run_dir, device="cpu", cache_root=run_dir.parent / "features", **options)


def without_seconds(history) -> list[dict]:
    """Epoch records without their wall time, the one thing two identical runs do not share."""
    return [{key: value for key, value in dataclasses.asdict(record).items() if key != "seconds"} for record in history]


def assert_same_tensors(path_a: Path, path_b: Path, prefix: str = "model.") -> None:
    """The two files hold the same tensors under `prefix` (a run state also holds the optimiser's)."""
    first, second = (
        {name: tensor for name, tensor in load_file(str(path)).items() if name.startswith(prefix)}
        for path in (path_a, path_b)
    )
    assert first and first.keys() == second.keys()
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, different


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_a_run_folder_holds_the_best_model_the_run_state_metrics_and_a_report(recipe_path, tmp_path):
    run_dir = tmp_path / "run"
    result = run_training(recipe_path, run_dir)
    expected = {"best.safetensors", "state.safetensors", "metrics.csv", "metrics.json",
                "report.json"} | ({"curves.png"} if matplotlib_available() else set())  # fmt: skip
    assert {path.name for path in run_dir.iterdir()} == expected
    assert [record.epoch for record in result.history] == [1, 2, 3]

    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0] == "epoch,train_loss,train_accuracy,validation_accuracy,learning_rate,seconds"
    assert [int(row.split(",")[0]) for row in rows[1:]] == [1, 2, 3]
    assert json.loads((run_dir / "metrics.json").read_text()) == [dataclasses.asdict(r) for r in result.history]

    report = json.loads((run_dir / "report.json").read_text())
    assert report["best_epoch"] == result.best_epoch
    assert report["validation"]["accuracy"] == result.best_validation_accuracy
    assert report["test"] == result.test.to_dict()
    info = read_info(run_dir / "best.safetensors")
    assert info.labels == LABELS
    assert info.metrics == report
    assert info.recipe == json.loads(json.dumps(load_recipe(recipe_path).to_dict()))
    # The run state is also a checkpoint of the last epoch's model.
    assert read_info(run_dir / "state.safetensors").metrics["epoch"] == 3
    load_model(run_dir / "state.safetensors")


def test_training_on_distinguishable_words_goes_well_above_chance(recipe_path, tmp_path):
    result = run_training(recipe_path, tmp_path / "run")
    chance = 1 / len(LABELS)
    assert result.best_validation_accuracy >= 0.7 > 2 * chance
    assert result.test.accuracy >= 0.7
    assert result.history[-1].train_loss < result.history[0].train_loss


def test_the_learning_rate_warms_up_for_an_epoch_then_decays_along_a_cosine(recipe_path, tmp_path):
    started = {}
    result = run_training(recipe_path, tmp_path / "run", "train.epochs=3", "train.warmup_epochs=1",
                          "train.learning_rate=0.002", on_start=started.update)  # fmt: skip
    # The rate recorded after each epoch is the one for the first step of the next.
    steps = math.ceil(started["clips_per_epoch"] / 4)
    expected = [0.002 * cosine_with_warmup(steps * epoch, steps, 3 * steps) for epoch in (1, 2, 3)]
    assert [record.learning_rate for record in result.history] == pytest.approx(expected)
    assert expected == pytest.approx([0.002, 0.001, 0.0])


def test_two_runs_with_the_same_seed_are_identical_and_another_seed_differs(recipe_path, tmp_path):
    first = run_training(recipe_path, tmp_path / "first")
    second = run_training(recipe_path, tmp_path / "second")
    assert without_seconds(second.history) == without_seconds(first.history)
    assert_same_tensors(tmp_path / "first" / "state.safetensors", tmp_path / "second" / "state.safetensors", "")
    other = run_training(recipe_path, tmp_path / "other", "train.seed=1")
    assert without_seconds(other.history) != without_seconds(first.history)


class RowsInMemory:
    """A split as training held it before the store: every row in one float32 tensor. The reference."""

    def __init__(self, store: WaveformStore) -> None:
        self.rows = torch.from_numpy(np.fromfile(store.path, "<f2").reshape(-1, store.samples)).float()

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, indices: torch.Tensor) -> torch.Tensor:
        return self.rows[indices].clone()

    def batches(self, size: int):
        return self.rows.split(size)


def test_training_from_the_store_on_disk_equals_training_from_the_rows_in_memory_bit_for_bit(
    recipe_path, tmp_path, monkeypatch
):
    overrides = ("train.mixup_alpha=0.2", "train.batch_size=5")
    from_store = run_training(recipe_path, tmp_path / "store", *overrides)
    load = kws.train.load_training_data

    def in_memory(*args, **options):
        dataset, data, skipped = load(*args, **options)
        in_memory = {name: SplitData(RowsInMemory(split.waveforms), split.labels) for name, split in data.items()}
        return dataset, in_memory, skipped

    monkeypatch.setattr(kws.train, "load_training_data", in_memory)
    from_memory = run_training(recipe_path, tmp_path / "memory", *overrides)
    assert without_seconds(from_store.history) == without_seconds(from_memory.history)
    assert from_store.test.to_dict() == from_memory.test.to_dict()
    assert_same_tensors(tmp_path / "store" / "state.safetensors", tmp_path / "memory" / "state.safetensors", "")


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("train.mixup_alpha=0.4",),
        ("train.mixup_alpha=0.4", "train.distill.teachers=[{teacher}]"),
        ("data.negative_speech=[{speech}]", "train.negative_speech_ratio=2"),
        ("data.negative_speech=[{speech}]", "train.negative_speech_ratio=2", "train.negative_speech_candidates=4"),
    ],
    ids=["plain", "mixup", "mixup-distill", "negative-speech", "negative-speech-hardest"],
)
def test_a_run_interrupted_after_an_epoch_and_resumed_ends_as_the_uninterrupted_run(
    recipe_path, tmp_path, overrides, write_wav, chirp
):
    teacher = tmp_path / "teacher.safetensors"
    source_checkpoint(teacher, LABELS, recipe_path)
    speech = tmp_path / "speech"
    write_wav(speech / "talk.wav", np.concatenate([chirp(300, 900, 1.0), chirp(900, 200, 1.5)]), 16000)
    overrides = [override.format(teacher=teacher, speech=speech) for override in overrides]
    uninterrupted = run_training(recipe_path, tmp_path / "uninterrupted", *overrides)

    def interrupt(record, is_best):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(recipe_path, tmp_path / "resumed", *overrides, on_epoch=interrupt)
    assert [row["epoch"] for row in json.loads((tmp_path / "resumed" / "metrics.json").read_text())] == [1]
    started = {}
    resumed = run_training(recipe_path, tmp_path / "resumed", *overrides, resume=True, on_start=started.update)
    assert started["start_epoch"] == 2
    assert without_seconds(resumed.history) == without_seconds(uninterrupted.history)
    assert (resumed.best_epoch, resumed.best_validation_accuracy) == (
        uninterrupted.best_epoch,
        uninterrupted.best_validation_accuracy,
    )
    for name in ("state.safetensors", "best.safetensors"):
        assert_same_tensors(tmp_path / "uninterrupted" / name, tmp_path / "resumed" / name)
    assert not list((tmp_path / "resumed").glob(".*partial*"))


KILL_WHILE_WRITING_THE_STATE = """
import os, signal, sys
from pathlib import Path
import torch
import kws.checkpoint
from kws.config import load_recipe
from kws.train import train

real_save_file = kws.checkpoint.save_file
written = []

def save_file(tensors, path, metadata=None):
    written.append(path)
    if len(written) == int(sys.argv[3]):
        real_save_file(tensors, path, metadata=metadata)
        Path(path).write_bytes(Path(path).read_bytes()[:1000])  # half-written
        os.kill(os.getpid(), signal.SIGKILL)
    real_save_file(tensors, path, metadata=metadata)

kws.checkpoint.save_file = save_file
torch.set_num_threads(1)  # as the tests run (conftest.py), so the sums add up alike
run_dir = Path(sys.argv[2])
train(load_recipe(sys.argv[1]), run_dir, device="cpu", cache_root=run_dir.parent / "features")
"""


@pytest.mark.parametrize("write", [2, 3, 4, 5])
def test_a_run_killed_while_writing_resumes_to_the_uninterrupted_result(recipe_path, tmp_path, write):
    """SIGKILL in the middle of each of the first file writes (epoch 1's state is the first): a state
    half-written (the one before must be used), and a state written but the best model not."""
    uninterrupted = run_training(recipe_path, tmp_path / "uninterrupted")
    run_dir = tmp_path / "killed"
    # Writes, in order: epoch 1's state and best model, then epoch 2's state, its best model if it is best, ...
    killed = subprocess.run([sys.executable, "-c", KILL_WHILE_WRITING_THE_STATE, str(recipe_path), str(run_dir),
                             str(write)], capture_output=True, text=True)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert list(run_dir.glob(".*partial*")), "the kill left a half-written file behind"
    resumed = run_training(recipe_path, run_dir, resume=True)
    assert without_seconds(resumed.history) == without_seconds(uninterrupted.history)
    for name in ("state.safetensors", "best.safetensors"):
        assert_same_tensors(tmp_path / "uninterrupted" / name, run_dir / name)
    assert (
        read_info(run_dir / "best.safetensors").metrics
        == read_info(tmp_path / "uninterrupted" / "best.safetensors").metrics
    )
    assert not list(run_dir.glob(".*partial*"))


def test_resuming_with_a_changed_recipe_is_an_error_naming_each_change(recipe_path, tmp_path):
    run_dir = tmp_path / "run"

    def interrupt(record, is_best):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(recipe_path, run_dir, on_epoch=interrupt)
    before = {path.name: path.read_bytes() for path in run_dir.iterdir()}
    with pytest.raises(ConfigError, match=r"train.epochs: 3 -> 5; train.learning_rate: 0.003 -> 0.01"):
        run_training(recipe_path, run_dir, "train.epochs=5", "train.learning_rate=0.01", resume=True)
    assert {path.name: path.read_bytes() for path in run_dir.iterdir()} == before
    # Settings that change only how fast the run goes may change.
    resumed = run_training(recipe_path, run_dir, "train.threads=1", resume=True)
    assert [record.epoch for record in resumed.history] == [1, 2, 3]


def test_mixup_draws_its_share_from_the_given_generator_alone():
    features = torch.randn(6, 3, 5)
    torch.manual_seed(1)
    first = mixup(features, 0.3, torch.Generator().manual_seed(7))
    torch.manual_seed(2)
    second = mixup(features, 0.3, torch.Generator().manual_seed(7))
    assert first[2] == second[2] and torch.equal(first[1], second[1])


def test_mixup_blends_each_clip_with_a_partner_keeping_the_larger_share_for_itself():
    features = torch.arange(8, dtype=torch.float32)[:, None, None].expand(8, 3, 5).clone()
    torch.manual_seed(0)
    shares = []
    for seed in range(20):
        blended, partners, share = mixup(features, 0.4, torch.Generator().manual_seed(seed))
        assert sorted(partners.tolist()) == list(range(8))
        torch.testing.assert_close(blended, share * features + (1 - share) * features[partners])
        shares.append(share)
    assert min(shares) >= 0.5 and max(shares) <= 1.0 and len(set(shares)) == 20


def test_distillation_loss_is_zero_where_the_student_agrees_and_its_gradient_points_at_the_teacher():
    torch.manual_seed(0)
    teacher_logits, student_logits = torch.randn(6, 4), torch.randn(6, 4, requires_grad=True)
    for temperature in (1.0, 3.0):
        agreed = distillation_loss(teacher_logits, torch.softmax(teacher_logits / temperature, 1), temperature)
        assert float(agreed) == pytest.approx(0.0, abs=1e-6)
    targets = torch.softmax(teacher_logits / 3.0, 1)
    loss = distillation_loss(student_logits, targets, 3.0)
    students = torch.softmax(student_logits.detach() / 3.0, 1)
    expected = (targets * (targets.log() - students.log())).sum(1).mean() * 9.0
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    # d(loss)/d(logits) = T (student - teacher) / batch: a step against it moves towards the teacher.
    torch.testing.assert_close(student_logits.grad, 3.0 * (students - targets) / 6)


def test_masked_distillation_counts_only_the_marked_clips_over_the_whole_batch():
    torch.manual_seed(1)
    student_logits, targets = torch.randn(4, 3), torch.softmax(torch.randn(4, 3), 1)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    whole = distillation_loss(student_logits, targets, 2.0)
    kept = distillation_loss(student_logits[[0, 2]], targets[[0, 2]], 2.0)
    assert float(distillation_loss(student_logits, targets, 2.0, mask)) == pytest.approx(float(kept) / 2, rel=1e-5)
    assert float(distillation_loss(student_logits, targets, 2.0, torch.ones(4))) == pytest.approx(float(whole))
    assert float(distillation_loss(student_logits, targets, 2.0, torch.zeros(4))) == 0.0


def test_teacher_probabilities_are_the_mean_of_each_teachers_softmax_at_the_temperature():
    class Fixed(torch.nn.Module):
        def __init__(self, logits: list[float]):
            super().__init__()
            self.logits = torch.tensor(logits)

        def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
            return self.logits.expand(len(waveforms), -1)

    first, second = [2.0, 0.0, -2.0], [0.0, 4.0, 0.0]
    probabilities = teacher_probabilities([Fixed(first), Fixed(second)], torch.zeros(5, 100), 2.0)
    expected = (torch.softmax(torch.tensor(first) / 2, 0) + torch.softmax(torch.tensor(second) / 2, 0)) / 2
    torch.testing.assert_close(probabilities, expected.expand(5, -1))


SWAPPED = {"yes": "no", "no": "yes"}


@pytest.mark.parametrize(
    "overrides, taught",
    [
        # Taught only by the teacher, the student learns its swap.
        (("train.distill.weight=1",), SWAPPED),
        # Distilling only the clips whose label is the teacher's top class (as for a teacher that never
        # heard continuous speech), the labels alone teach the words the teacher gets wrong.
        (("train.distill.weight=0.8", "train.distill.agreeing_only=true"), {}),
    ],
    ids=["teacher-only", "agreeing-only"],
)
def test_a_student_of_a_teacher_that_swaps_two_words(recipe_path, tmp_path, overrides, taught):
    run_training(recipe_path, tmp_path / "teacher")
    teacher, info = load_model(tmp_path / "teacher" / "best.safetensors")
    yes, no = LABELS.index("yes"), LABELS.index("no")
    with torch.no_grad():
        for tensor in (teacher.head.weight, teacher.head.bias):
            tensor[[yes, no]] = tensor[[no, yes]].clone()
    save_checkpoint(tmp_path / "swapped.safetensors", teacher, info)

    teacher = f"train.distill.teachers=[{tmp_path / 'swapped.safetensors'}]"
    run_training(recipe_path, tmp_path / "student", "train.epochs=8", "train.distill.temperature=1", *overrides,
                 teacher)  # fmt: skip
    # The best epoch is chosen against the true labels, so look at the last one.
    student, _ = load_model(tmp_path / "student" / "state.safetensors")
    clips = [clip for clip in load_dataset(load_recipe(recipe_path).data).split("testing") if clip.label in LABELS[2:]]
    with torch.no_grad():
        heard = [LABELS[int(student(torch.from_numpy(load_clip(clip, 16000, 8000))[None]).argmax())] for clip in clips]
    assert heard == [taught.get(clip.label, clip.label) for clip in clips]


def test_a_teacher_with_other_labels_is_a_config_error_naming_it(recipe_path, tmp_path):
    source_checkpoint(tmp_path / "other.safetensors", ("_silence_", "_unknown_", "up", "down"), recipe_path)
    with pytest.raises(ConfigError, match="other.safetensors has the labels _silence_, _unknown_, up, down"):
        run_training(recipe_path, tmp_path / "run", f"train.distill.teachers=[{tmp_path / 'other.safetensors'}]")
    assert not (tmp_path / "run").exists()


def test_resuming_a_folder_without_an_earlier_run_raises_kws_error(recipe_path, tmp_path):
    with pytest.raises(KWSError, match="nothing to resume"):
        run_training(recipe_path, tmp_path / "empty", resume=True)


def test_training_into_a_folder_holding_an_earlier_run_without_resume_raises_kws_error(recipe_path, tmp_path):
    run_dir = tmp_path / "run"
    run_training(recipe_path, run_dir, "train.epochs=1")
    before = {path.name: path.read_bytes() for path in run_dir.iterdir()}
    with pytest.raises(KWSError, match="--resume"):
        run_training(recipe_path, run_dir, "train.epochs=1")
    assert {path.name: path.read_bytes() for path in run_dir.iterdir()} == before


def test_without_a_validation_split_every_epoch_is_kept_and_the_last_is_best(recipe_path, words_folder, tmp_path):
    for split in ("validation", "testing"):
        (words_folder / f"{split}_list.txt").unlink()
    run_dir = tmp_path / "run"
    result = run_training(recipe_path, run_dir, "train.epochs=2", "data.testing_speakers=[spk5]")
    assert all(record.validation_accuracy is None for record in result.history)
    assert result.best_epoch == 2
    assert result.test is not None and result.test.confusion.sum() == 3 * 3 + 1  # 3 words x 3 clips, 1 silence
    assert_same_tensors(run_dir / "best.safetensors", run_dir / "state.safetensors")
    report = json.loads((run_dir / "report.json").read_text())
    assert report["validation"] is None and report["best_epoch"] == 2


def source_checkpoint(path: Path, labels: tuple[str, ...], recipe_path: Path) -> dict[str, torch.Tensor]:
    """Save a resnet_tiny for `labels` whose weights are all unlike a fresh model's; return its state."""
    recipe = load_recipe(recipe_path)
    architecture, arguments = recipe.model.architecture()
    torch.manual_seed(123)
    model = build_model(architecture, arguments, len(labels), recipe.features)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    save_checkpoint(path, model, ModelInfo(architecture, arguments, recipe.features, labels))
    return model.state_dict()


def fresh_model(recipe_path: Path, num_classes: int) -> torch.nn.Module:
    recipe = load_recipe(recipe_path)
    return build_model(*recipe.model.architecture(), num_classes, recipe.features)


def test_init_from_a_model_with_other_labels_copies_all_but_the_head(recipe_path, tmp_path):
    source = source_checkpoint(tmp_path / "source.safetensors", ("_silence_", "_unknown_", "up", "down"), recipe_path)
    model = fresh_model(recipe_path, len(LABELS))
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    reinitialised = initialise_from(model, tmp_path / "source.safetensors", LABELS)
    assert reinitialised == ["head.weight", "head.bias"]
    for name, tensor in model.state_dict().items():
        expected = initial[name] if name.startswith("head.") else source[name]
        assert torch.equal(tensor, expected), name


def test_init_from_a_model_with_the_same_labels_copies_everything(recipe_path, tmp_path):
    source = source_checkpoint(tmp_path / "source.safetensors", LABELS, recipe_path)
    model = fresh_model(recipe_path, len(LABELS))
    assert initialise_from(model, tmp_path / "source.safetensors", LABELS) == []
    assert all(torch.equal(tensor, source[name]) for name, tensor in model.state_dict().items())


def test_init_from_another_network_is_an_error_not_training_from_scratch(recipe_path, tmp_path):
    source_checkpoint(tmp_path / "source.safetensors", LABELS, recipe_path)
    recipe = load_recipe(recipe_path)
    wide = dataclasses.replace(recipe.model, name="resnet_wide")
    wider = build_model(*wide.architecture(), len(LABELS), recipe.features)
    with pytest.raises(ConfigError, match=r"--init .*source.safetensors: a .* whose layers do not fit .* differ"):
        initialise_from(wider, tmp_path / "source.safetensors", LABELS)


def test_training_with_init_reports_the_new_head(recipe_path, tmp_path):
    source_checkpoint(tmp_path / "source.safetensors", ("_silence_", "_unknown_", "no", "yes"), recipe_path)
    started = {}
    run_training(recipe_path, tmp_path / "run", "train.epochs=1", init=str(tmp_path / "source.safetensors"),
                 on_start=started.update)  # fmt: skip
    assert started["labels"] == LABELS
    assert started["reinitialised"] == ["head.weight", "head.bias"]


def test_negative_speech_windows_are_slices_of_one_recording_or_a_short_recording_whole_amid_silence():
    long = torch.arange(1, 5001, dtype=torch.float32)  # every sample tells where it came from
    short = -torch.arange(1, 301, dtype=torch.float32)
    speech = NegativeSpeech([long, short], window=1000)
    windows = speech.windows(400, torch.Generator().manual_seed(0))
    from_long = windows[:, 0] > 0
    for window in windows[from_long]:
        assert torch.equal(window, torch.arange(window[0], window[0] + 1000))  # contiguous, inside the recording
    starts = windows[from_long][:, 0]
    assert starts.min() < 500 and starts.max() > 3500  # at any offset, to the very end (4001)
    for window in windows[~from_long]:
        spoken = torch.nonzero(window).flatten()
        assert len(spoken) == 300 and torch.equal(window[spoken], short)
    # Drawn in proportion to length: 5000 against max(300, 1000) = 1000.
    assert 0.75 < float(from_long.float().mean()) < 0.92


def test_negative_speech_stretches_hold_windows_a_hop_apart_and_one_candidate_is_a_random_window():
    long = torch.arange(1, 5001, dtype=torch.float32)
    speech = NegativeSpeech([long, -torch.arange(1, 301, dtype=torch.float32)], window=1000)
    stretches = speech.stretches(200, 4, 300, torch.Generator().manual_seed(0))
    from_long = stretches[:, 0, 0] > 0
    for stretch in stretches[from_long]:
        first = stretch[0, 0]
        for column, window in enumerate(stretch):
            assert torch.equal(window, torch.arange(first + 300 * column, first + 300 * column + 1000))
    assert float(stretches[from_long][:, -1, -1].max()) > 4900  # stretches reach to the recording's end
    for stretch in stretches[~from_long]:
        assert bool((stretch == stretch[0]).all())  # a clip shorter than a window: one placement
    one = speech.stretches(50, 1, 300, torch.Generator().manual_seed(1))[:, 0]
    assert torch.equal(one, speech.windows(50, torch.Generator().manual_seed(1)))


class LoudIsYes(torch.nn.Module):
    """Labels (_silence_, _unknown_, yes): the louder the window's mean, the more it is `yes`."""

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.zeros(len(waveforms)), torch.zeros(len(waveforms)), waveforms.mean(1)], 1)


def test_hardest_windows_keep_the_window_the_model_finds_most_keyword_like():
    rising, falling = torch.linspace(0, 1, 4000), torch.linspace(1, 0, 4000)
    model = LoudIsYes().train()
    hardest = HardestWindows(model, (2,), candidates=5, hop=500, device=torch.device("cpu"))
    for recording, loudest in ((rising, -1), (falling, 0)):  # the last window of each stretch, or the first
        speech = NegativeSpeech([recording], window=1000)
        stretches = speech.stretches(30, 5, 500, torch.Generator().manual_seed(0))
        chosen = hardest.windows(speech, 30, torch.Generator().manual_seed(0))
        assert torch.equal(chosen, stretches[:, loudest])
    short = NegativeSpeech([torch.full((300,), 0.5)], window=1000)
    assert int((hardest.windows(short, 3, torch.Generator()) != 0).sum(1).max()) == 300
    assert model.training  # scored in eval mode, handed back as it was


def test_an_epoch_holds_the_negative_speech_windows_asked_for_labelled_unknown(tmp_path):
    with open(tmp_path / "training.waveforms", "wb") as handle:
        append_waveforms(handle, torch.ones(10, 1000))
    split = SplitData(WaveformStore(tmp_path / "training.waveforms", 1000), torch.tensor([2] * 5 + [3] * 5))
    speech = NegativeSpeech([torch.full((3000,), 0.5)], window=1000)
    generator = torch.Generator().manual_seed(0)
    order = epoch_order(torch.ones(10), 20, 7, generator)
    assert len(order) == 27 and int((order < 0).sum()) == 7
    waveforms, labels = draw_batch(split, order, speech, 1, generator)
    assert torch.equal(labels == 1, order < 0)
    assert bool((waveforms[order < 0] == 0.5).all()) and bool((waveforms[order >= 0] == 1.0).all())


def test_class_sampling_weights_draw_unknown_and_silence_at_the_configured_multiple_of_the_mean_keyword():
    names = ("_silence_", "_unknown_", "yes", "no", "up")
    labels = torch.tensor([0] * 2 + [1] * 10 + [2] * 4 + [3] * 6)  # no clips of up
    weights = class_sampling_weights(labels, names, TrainConfig(unknown_ratio=0.5, silence_ratio=2.0))
    # The mean keyword class has (4 + 6) / 2 = 5 clips (up, with none, does not count). An epoch draws
    # _silence_ 2 x 5 = 10 times from 2 clips, _unknown_ 0.5 x 5 = 2.5 times from 10, keywords as they are.
    assert weights.tolist() == pytest.approx([5.0] * 2 + [0.25] * 10 + [1.0] * 4 + [1.0] * 6)
    per_class = torch.zeros(len(names)).index_add_(0, labels, weights)
    assert per_class.tolist() == pytest.approx([10.0, 2.5, 4.0, 6.0, 0.0])


def test_class_sampling_weights_of_zero_leave_unknown_and_silence_out():
    labels = torch.tensor([0, 1, 1, 2, 2, 2])
    weights = class_sampling_weights(labels, LABELS[:3], TrainConfig(unknown_ratio=0.0, silence_ratio=0.0))
    assert weights.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("step", "factor"),
    [(0, 0.25), (1, 0.5), (3, 1.0), (4, 1.0), (6, 0.5 + math.sqrt(2) / 4), (8, 0.5), (12, 0.0), (20, 0.0)],
)
def test_cosine_with_warmup_rises_linearly_over_4_steps_then_falls_to_zero_at_step_12(step, factor):
    assert cosine_with_warmup(step, 4, 12) == pytest.approx(factor)


NO_AUGMENTATION = AugmentConfig(
    time_shift_ms=0.0, gain_db_range=(0.0, 0.0), speed_range=(1.0, 1.0), noise_probability=0.0,
    freq_masks=0, time_masks=0,
)  # fmt: skip


def augmenter(config: AugmentConfig, noise: list[torch.Tensor] | None = None, seed: int = 0) -> Augmenter:
    return Augmenter(config, noise or [], 16000, torch.Generator().manual_seed(seed))


def test_with_every_augmentation_off_clips_and_features_are_unchanged(noise):
    batch = torch.from_numpy(np.stack([noise(0.5, seed=seed) for seed in range(4)]))
    features = torch.randn(4, 40, 51, generator=torch.Generator().manual_seed(0))
    unchanged = augmenter(NO_AUGMENTATION, [torch.from_numpy(noise(2.0, seed=9))])
    assert torch.equal(unchanged.waveforms(batch.clone()), batch)
    assert torch.equal(unchanged.spectrogram(features.clone()), features)


def test_time_shift_moves_a_click_by_at_most_the_configured_samples_and_fills_with_silence():
    shift_ms = 5.0  # 80 samples
    batch = torch.full((300, 1000), 0.1)
    batch[:, 500] = 1.0
    shifted = augmenter(dataclasses.replace(NO_AUGMENTATION, time_shift_ms=shift_ms)).waveforms(batch.clone())
    shifts = shifted.argmax(dim=1) - 500
    assert shifts.abs().max() <= 80
    assert shifts.min() < -60 and shifts.max() > 60  # both ways, across the range
    for clip, shift in zip(shifted, shifts.tolist()):
        assert torch.equal(torch.roll(batch[0], shift)[80:-80], clip[80:-80])
        silent = clip[:shift] if shift > 0 else clip[len(clip) + shift :]
        assert torch.count_nonzero(clip == 0) == abs(shift) == len(silent) and torch.all(silent == 0)


def test_gain_scales_each_clip_by_a_level_within_the_configured_range(tone):
    batch = torch.from_numpy(np.stack([tone(440, 0.1)] * 200))
    scaled = augmenter(dataclasses.replace(NO_AUGMENTATION, gain_db_range=(-10.0, 6.0))).waveforms(batch.clone())
    gains_db = 20 * torch.log10(scaled.abs().amax(dim=1) / batch.abs().amax(dim=1))
    assert gains_db.min() >= -10.0 - 1e-4 and gains_db.max() <= 6.0 + 1e-4
    assert gains_db.min() < -8 and gains_db.max() > 4
    torch.testing.assert_close(scaled / scaled.abs().amax(dim=1, keepdim=True), batch / batch.abs().amax())


def test_a_speed_change_raises_a_tones_pitch_by_the_speed(tone):
    batch = torch.from_numpy(np.stack([tone(500, 0.5)] * 2))
    faster = augmenter(dataclasses.replace(NO_AUGMENTATION, speed_range=(1.25, 1.25))).waveforms(batch.clone())
    assert faster.shape == batch.shape
    spectrum = np.abs(np.fft.rfft(faster[0, 1000:-1000].numpy() * np.hanning(6000), n=1 << 16))
    peak_hz = np.fft.rfftfreq(1 << 16, 1 / 16000)[spectrum.argmax()]
    assert peak_hz == pytest.approx(625, abs=2)


def test_mixed_noise_has_a_level_within_the_configured_range(noise):
    room = [torch.from_numpy(noise(3.0, rms=0.3, seed=5))]
    config = dataclasses.replace(NO_AUGMENTATION, noise_probability=1.0, noise_db_range=(-30.0, -20.0))
    mixed = augmenter(config, room).waveforms(torch.zeros(50, 8000))
    levels_db = 20 * torch.log10(mixed.square().mean(dim=1).sqrt())
    assert levels_db.min() >= -30.0 - 1e-3 and levels_db.max() <= -20.0 + 1e-3


def test_a_room_response_is_the_direct_sound_then_a_tail_of_equal_energy_falling_60_db_in_its_rt60():
    response = room_response(0.5, 16000, torch.Generator().manual_seed(0)).double()
    assert len(response) == 8000 and response[0] == 1.0
    assert float(response[1:].square().sum()) == pytest.approx(1.0, rel=1e-5)
    first, last = response[1:800].square().mean(), response[-800:].square().mean()  # 0.05 s each, 0.45 s apart
    assert 10 * math.log10(first / last) == pytest.approx(60 * 0.45 / 0.5, abs=4)


def test_fft_convolution_is_numpys_full_convolution(noise):
    signal, response = noise(0.3, seed=1), noise(0.05, seed=2)
    expected = np.convolve(signal.astype(np.float64), response.astype(np.float64))
    found = fft_convolve(torch.from_numpy(signal).double(), torch.from_numpy(response).double()).numpy()
    np.testing.assert_allclose(found, expected, atol=1e-9)


def test_reverberation_keeps_the_clip_length_and_leaves_clips_it_did_not_choose_unchanged(noise):
    batch = torch.from_numpy(np.stack([noise(0.5, seed=seed) for seed in range(40)]))
    config = dataclasses.replace(NO_AUGMENTATION, reverb_probability=0.5, reverb_rt60_s_range=(0.3, 0.3))
    reverberant = augmenter(config).waveforms(batch.clone())
    changed = [not torch.equal(a, b) for a, b in zip(reverberant, batch)]
    assert reverberant.shape == batch.shape and 5 < sum(changed) < 35
    index = changed.index(True)
    tail = reverberant[index] - batch[index]  # the room's sound: the clip convolved with the tail alone
    assert 0.3 < float(tail.square().mean() / batch[index].square().mean()) < 3


@pytest.mark.parametrize(("axis", "config"), [
    (1, dataclasses.replace(NO_AUGMENTATION, freq_masks=1, freq_mask_bands=5)),
    (2, dataclasses.replace(NO_AUGMENTATION, time_masks=1, time_mask_frames=10)),
], ids=["bands", "frames"])  # fmt: skip
def test_spec_augment_sets_whole_bands_or_frame_ranges_to_the_clip_mean(axis, config):
    features = 10 * torch.randn(64, 40, 51, generator=torch.Generator().manual_seed(0)) - 50
    masked = augmenter(config).spectrogram(features.clone())
    fill = features.mean(dim=(1, 2))
    width = config.freq_mask_bands if axis == 1 else config.time_mask_frames
    masked_clips = 0
    for clip in range(len(features)):
        changed = (masked[clip] != features[clip]).any(dim=2 - axis)  # per band (axis 1) or frame (axis 2)
        rows = torch.nonzero(changed).flatten()
        if len(rows) == 0:
            continue
        masked_clips += 1
        assert len(rows) <= width and torch.equal(rows, torch.arange(rows[0], rows[0] + len(rows)))
        whole = masked[clip].index_select(axis - 1, rows)
        assert torch.all(whole == fill[clip])
    assert masked_clips > len(features) // 2


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.augment.speed_range=[1.2, 0.9]", "train.augment.speed_range"),
        ("train.augment.noise_probability=1.5", "train.augment.noise_probability"),
        ("train.augment.pitch=2", "train.augment.pitch"),
        ("train.learning_rate=0", "train.learning_rate"),
        ("train.mixup_alpha=-0.1", "train.mixup_alpha"),
        ("train.distill.temperature=0", "train.distill.temperature"),
        ("train.distill.weight=1.5", "train.distill.weight"),
        ("train.distill.teacher=x", "train.distill.teacher"),
    ],
)
def test_bad_training_settings_raise_config_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_recipe(None, [override])


def run(*args: str | Path):
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    return result.exit_code, result.stdout, result.stderr


def test_kws_train_writes_a_model_that_kws_evaluate_scores_as_a_clip_by_clip_loop_does(
    recipe_path, words_folder, tmp_path
):
    out, cache = tmp_path / "run", tmp_path / "features"
    code, _, stderr = run("train", recipe_path, "--out", out, "--epochs", "1", "--cache", cache, "--device", "cpu")
    assert code == 0, stderr
    assert (out / "best.safetensors").is_file() and "best validation accuracy" in stderr
    code, _, stderr = run("evaluate", out / "best.safetensors", words_folder, "--split", "testing",
                          "--json", tmp_path / "test.json", "--device", "cpu")  # fmt: skip
    assert code == 0, stderr
    evaluated = json.loads((tmp_path / "test.json").read_text())

    model, info = load_model(out / "best.safetensors")
    clips = load_dataset(load_recipe(recipe_path).data).split("testing")
    confusion = np.zeros((len(LABELS), len(LABELS)), dtype=int)
    with torch.no_grad():
        for clip in clips:
            waveform = torch.from_numpy(load_clip(clip, 16000, info.features.clip_samples))
            confusion[LABELS.index(clip.label), int(model(waveform[None]).argmax())] += 1
    assert evaluated["labels"] == list(LABELS)
    assert evaluated["confusion"] == confusion.tolist()
    assert evaluated["accuracy"] == pytest.approx(np.trace(confusion) / len(clips))
    assert evaluated["confusion"] == json.loads((out / "report.json").read_text())["test"]["confusion"]


def test_kws_train_with_a_teacher_that_does_not_exist_exits_2_with_one_line(recipe_path, tmp_path):
    code, _, stderr = run("train", recipe_path, "--out", tmp_path / "run", "--epochs", "1", "--device", "cpu",
                          "--cache", tmp_path / "features", "--set", "train.distill.teachers=[nowhere]")  # fmt: skip
    assert code == 2
    assert stderr.strip().splitlines() == ["error: nowhere: no such model file, run folder, or shipped model"]


def test_kws_train_into_a_folder_holding_an_earlier_run_exits_2_with_one_line(recipe_path, tmp_path):
    arguments = ("train", recipe_path, "--out", tmp_path / "run", "--epochs", "1", "--cache", tmp_path / "features",
                 "--device", "cpu")  # fmt: skip
    assert run(*arguments)[0] == 0
    code, stdout, stderr = run(*arguments)
    assert code == 2
    assert stderr.strip().splitlines() == [
        f"error: {tmp_path / 'run'}: holds an earlier run; use --resume to continue it or choose another --out"
    ]
