"""The driver's head start: it explains a pass's first batch while Ray starts the explain actors.

An explain actor starts in a fresh process that imports torch and torchvision and builds the
model: seconds before its first row (about 6 s on a 2-core machine, 2 s of them before the
import even begins), most of a small audit's time to its first written batch. The driver has
all of that loaded already. So where the driver may compute as an actor would, it takes the
pass's first batch and explains it in a thread, with the job's own stages (the read stage,
then :class:`~audit.pipeline.stages.Explainer` with the actors' options and thread count) and
the job's batch formats between them, while Ray Data explains the rest. Its rows are the rows
an actor writes.

Where the driver may compute (:func:`driver_may_explain`): a CPU run on the local Ray instance
this driver started, its workers the driver's children, with its environment and its files, so
the driver reads what they read and computes as they do, in float32 on a CPU. A GPU run has no
head start (the driver has no GPU of Ray's, and rows are computed in the run's precision on its
device); nor a driver joining a cluster (its node may lack the data, the credentials or the
memory), nor a run placed by ``--node-resource``. A head start that fails leaves its rows
pending for the actors.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from audit.errors import first_line
from audit.pipeline.read import read_batch
from audit.pipeline.stages import Explainer


def driver_may_explain(gpus_per_actor: float, resources: dict) -> bool:
    """True for a CPU plan without a custom resource, on a local Ray instance this process started."""
    import ray

    node = getattr(ray._private.worker.global_worker, "node", None)
    return not gpus_per_actor and not resources and bool(getattr(node, "head", False))


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
    """Runs ``explain`` then ``write`` on one batch in a thread for the block; the block waits for it at its end.

    ``error`` holds the one-line reason when the head start failed (its rows then stay pending)."""

    def __init__(self, explain: Callable[[], pa.Table], write: Callable[[pa.Table], None]) -> None:
        self.explain, self.write = explain, write
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name="cam-audit-head-start", daemon=True)

    def __enter__(self) -> HeadStart:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join()

    def _run(self) -> None:
        try:
            table = self.explain()
            if table.num_rows:
                self.write(table)
        except Exception as exc:  # noqa: BLE001 - any failure hands the batch to the actors
            self.error = first_line(exc) or type(exc).__name__
