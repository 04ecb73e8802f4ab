"""Partitions classified on a Dask cluster (`kws classify --engine dask`): one task per partition, the
model sent once to every worker and loaded there once (a worker plugin), results gathered as they finish.

With no scheduler address a local cluster of worker processes starts for the run and stops after it.
Workers open the audio files by their absolute paths, so on a real cluster every worker must see them
at the same place (a shared file system) and have kws installed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from distributed import Client, LocalCluster, WorkerPlugin, as_completed, get_worker

from kws.batch import ClassifyOptions, RunPartitions, classify_partition, file_sha256
from kws.classify import FileResult
from kws.errors import KWSError


class ModelOnWorker(WorkerPlugin):
    """Carries a model file's bytes to each worker and loads the model there once, when the worker joins."""

    def __init__(self, model_path: Path, options: ClassifyOptions) -> None:
        self.name = f"kws-model-{file_sha256(model_path)[:16]}"
        self.model_bytes, self.suffix, self.options = model_path.read_bytes(), model_path.suffix, options
        self.model = self.info = None

    def setup(self, worker) -> None:
        import torch

        from kws.checkpoint import load_model
        from kws.models import optimize_for_inference

        torch.set_num_threads(self.options.threads)
        path = Path(worker.local_directory) / f"{self.name}{self.suffix}"
        path.write_bytes(self.model_bytes)
        model, self.info = load_model(path, self.options.device)
        self.model = optimize_for_inference(model, self.info.features.clip_samples)


def _classify_on_worker(plugin_name: str, files: list[Path], options: ClassifyOptions) -> list[FileResult]:
    plugin = get_worker().plugins[plugin_name]
    return classify_partition(plugin.model, plugin.info, files, options)


@contextmanager
def dask_client(address: str | None, workers: int) -> Iterator[Client]:
    """A client of the scheduler at `address`, or of a local cluster of `workers` single-threaded processes."""
    if address:
        try:
            client = Client(address, timeout="20s")
        except OSError as error:
            raise KWSError(f"--address {address}: no Dask scheduler answered ({error})") from None
        with client:
            yield client
        return
    with LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
    ) as cluster, Client(cluster) as client:  # fmt: skip
        yield client


def run_on_dask(client: Client, model_path: Path, options: ClassifyOptions) -> RunPartitions:
    """Partitions as Dask tasks on `client`'s workers; results come back in the order they finish."""
    plugin = ModelOnWorker(model_path, options)
    client.register_plugin(plugin, name=plugin.name)

    def run(parts: Sequence[tuple[int, list[Path]]]) -> Iterator[tuple[int, list[FileResult]]]:
        futures = {client.submit(_classify_on_worker, plugin.name, files, options): index for index, files in parts}
        for future in as_completed(futures):
            yield futures[future], future.result()

    return run
