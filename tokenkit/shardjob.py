"""The loop that both sharded jobs (`features`, `tokenize`) run, so they resume and split ranks alike.

A job is N source rows cut into work shards of `shard_size` rows. Rank 0 creates or checks the output
(`Journal.begin`); every rank then takes its pending shards (round-robin), feeds their batches to a
`ShardWriter`, and commits each finished shard with a record; rank 0 collects the records into the manifest.
A finished shard's files are written and committed on a second thread while the next shard's batches run
(one shard in flight, committed in order), so the model does not wait for tar building, checksums and
fsync. Bad images are skipped and listed (`on_error="skip"`) or stop the job (`"raise"`).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, nullcontext
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from tokenkit.errors import ImageError
from tokenkit.journal import Journal, shard_ranges
from tokenkit.loader import ViewDataset, iter_shard_batches
from tokenkit.lock import OutputLock
from tokenkit.stopsignal import Stopped, StopSignal


class ShardWriter(Protocol):
    device: torch.device  # where the model runs: batches are pinned for it when it is a GPU

    def begin(self, start: int, stop: int) -> None:
        """A new work shard of rows [start, stop) starts: allocate its buffers."""

    def add(self, items: list[dict], pixels: torch.Tensor) -> None:
        """The decoded items of one batch (ViewDataset items without errors) and their views' pixels,
        (len(items) * V, S, S, 3) uint8 in item order."""

    def seal(self, shard: int) -> Callable[[], dict]:
        """The shard's rows are all added: return a function that writes its files and returns its record (at
        least "ok", the stored count, and "sha256"). It runs on the commit thread while the next shard
        fills, so it may use only what it holds now (`begin` starts new buffers)."""


def run_shards(
    out: Path,
    spec: dict,
    init: Callable[[], None],
    dataset: ViewDataset,
    writer: ShardWriter,
    manifest: Callable[[list[dict]], dict],
    cfg,
    resume: bool,
    dist: tuple[int, int, Callable[[], None]],
    progress: bool,
) -> None:
    """Run (or resume) the job whose output is `out`; rank 0 writes manifest(records) at the end.

    cfg: the job's config (shard_size, batch_size, workers, on_error); dist: (rank, world, barrier).
    """
    rank, world, barrier = dist
    with OutputLock(out) if rank == 0 else nullcontext():  # one writer: rank 0 of one job holds it
        _run(out, spec, init, dataset, writer, manifest, cfg, resume, dist, progress)


def _run(out, spec, init, dataset, writer, manifest, cfg, resume, dist, progress) -> None:
    rank, world, barrier = dist
    shard_size, on_error = cfg.shard_size, cfg.on_error
    journal = Journal(out)
    complete = journal.begin(spec, resume, init) if rank == 0 else None
    barrier()
    if complete or journal.is_complete():
        return
    keys = dataset.source.keys
    ranges = shard_ranges(len(dataset), shard_size)
    todo = [(i, *ranges[i]) for i in journal.pending(len(ranges), rank, world)]
    total = sum(e - s for _, s, e in todo)
    bar = tqdm(total=total, unit="img", disable=not progress, desc=f"{spec['job']}[{rank}]")
    current, skipped = None, []
    pin = writer.device.type == "cuda"
    inflight: Future | None = None  # the commit of the previous shard

    def commit(sid: int, write: Callable[[], dict], meta: dict) -> None:  # on the commit thread
        journal.commit(sid, {**write(), **meta})

    # a SIGTERM stops the job after the shard in flight is committed; leaving the pool waits for its commit
    # closing: the loader's workers end with the job however it ends (an error raised here, a signal)
    with (
        StopSignal() as stop,
        ThreadPoolExecutor(1, thread_name_prefix="commit") as pool,
        closing(iter_shard_batches(dataset, todo, cfg.batch_size, cfg.workers, pin)) as batches,
    ):
        for sid, items, pixels, last in batches:
            if sid != current:
                current, skipped = sid, []
                writer.begin(*ranges[sid])
            for it in items:
                if it["error"] is not None:
                    if on_error == "raise":
                        raise ImageError(f"{it['error']} (or pass --on-error skip)")
                    skipped.append([keys[it["index"]], it["error"]])
            ok = [it for it in items if it["error"] is None]
            if ok:
                writer.add(ok, pixels)
            bar.update(len(items))
            if last:
                write, meta = writer.seal(sid), {"shard": sid, "rows": list(ranges[sid]), "skipped": skipped}
                if inflight is not None:
                    inflight.result()  # raises the commit thread's error here
                inflight = pool.submit(commit, sid, write, meta)
                if stop.signum is not None:
                    inflight.result()
                    bar.close()
                    raise Stopped(stop.signum, f"after work shard {sid}: {out} resumes with --resume")
        if inflight is not None:
            inflight.result()
    bar.close()
    barrier()
    if rank == 0:
        journal.finish(manifest(journal.records(len(ranges))))
    barrier()
