"""The driver's head start: it explains a pass's first batch while Ray starts the explain actors.

An explain actor starts in a fresh process that imports torch and torchvision and builds the
model: seconds before its first row (about 6 s on a 2-core machine, 2 s of them before the
import even begins), most of a small audit's time to its first written batch. The driver has
all of that loaded already. So where the driver may compute as an actor would, it takes the
pass's first batch and explains it in a thread, with the job's own stages (the read stage,
then :class:`~audit.pipeline.stages.Explainer` with the actors' options and thread count) and
the job's batch formats between them, while Ray Data explains the rest. Its rows are the rows
an actor writes.

Where the driver may compute (:func:`driver_may_explain`): a CPU run on a local Ray instance
this driver started (:func:`~audit.pipeline.cluster.start_local_ray`), whose workers are the
driver's children, with its environment, its files and its code, so the driver reads what they
read and computes as they do, on a CPU in the run's precision. A GPU run has no head start (the
driver has no GPU of Ray's, and rows are computed on the run's device); nor a driver joining a
cluster (its node may lack the data, the credentials or the memory), nor a run placed by
``--node-resource``. A head start that fails to explain its batch leaves the rows pending for
the actors; one whose pass is stopped (Ctrl-C, a failed job) writes nothing after it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from audit.pipeline.cluster import driver_started_ray
from audit.pipeline.read import read_batch
from audit.pipeline.stages import Explainer, one_line


def driver_may_explain(gpus_per_actor: float, resources: dict) -> bool:
    """True for a CPU plan without a custom resource, on a local Ray instance this process started."""
    return not gpus_per_actor and not resources and driver_started_ray()


def explain_in_driver(frame: pd.DataFrame, read_kwargs: dict, explainer_kwargs: dict) -> pa.Table:
    """The table an actor returns for ``frame`` (one batch of pending rows), computed here.

    Between the stages each batch takes the form Ray Data gives it (a block, then a numpy batch),
    so the explainer sees what an actor sees. The explainer sets torch's thread count to the
    actors'; the driver's is restored after."""
    threads = torch.get_num_threads()
    try:
        read = read_batch(_as_job_batch(frame), **read_kwargs)
        explainer = Explainer(**explainer_kwargs, device="cpu")
        return explainer(_as_job_batch(read))
    finally:
        torch.set_num_threads(threads)


def _as_job_batch(batch: pd.DataFrame | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(BlockAccessor.batch_to_block(batch)).to_batch_format("numpy")


class HeadStart:
    """Runs ``explain`` then ``write`` on one batch in a thread while the block runs.

    At the block's end it waits for the thread, and raises a failed write there (as a write on
    the main thread would fail the pass); ``error`` holds why ``explain`` failed, its rows then
    left pending. A block that raises (Ctrl-C, a failed job) does not wait for the batch: the
    thread writes nothing after it.
    """

    def __init__(self, explain: Callable[[], pa.Table], write: Callable[[pa.Table], None]) -> None:
        self.explain, self.write = explain, write
        self.error: str | None = None
        self.write_error: BaseException | None = None
        self.stopped = False
        self.lock = threading.Lock()  # a write in progress finishes before the block is left
        self.thread = threading.Thread(target=self._run, name="cam-audit-head-start", daemon=True)

    def __enter__(self) -> HeadStart:
        self.thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None:
            with self.lock:
                self.stopped = True
            return
        self.thread.join()
        if self.write_error is not None:
            raise self.write_error

    def _run(self) -> None:
        try:
            table = self.explain()
        except Exception as exc:  # noqa: BLE001 - any failure to explain hands the batch to the actors
            self.error = one_line(exc)
            return
        with self.lock:
            if self.stopped or not table.num_rows:
                return
            try:
                self.write(table)
            except BaseException as exc:  # noqa: BLE001 - raised on the main thread at the block's end
                self.write_error = exc
