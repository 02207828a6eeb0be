"""Batches made ahead by a background thread or process, with an exact state.

A producer runs the loader and sends, for each batch, (batch, state, skipped):
the loader's state and skipped counts just after that batch. It keeps up to
`depth` batches ready. The consumer keeps the state of the last batch it took,
so state_dict() never skips batches that were prefetched but not consumed:
resuming from it, with or without prefetch, yields exactly the batches that
came next.

  thread   a daemon thread runs the consumer's own loader into a
           queue.Queue(depth) (file reads and torch ops release the GIL)
  process  a spawned process builds its own loader from a LoaderSpec (config,
           dump_dir, rank, world_size) at the consumer's state. It writes each
           batch into one of `depth` slots of shared-memory tensors and sends
           only (slot, state, skipped) through a multiprocessing queue; the
           consumer copies the slot out (numpy: no torch intra-op threads to
           wake on busy cores) and frees it. Small messages never wait in a
           full pipe for the producer's GIL.

An exception in the producer is raised in the consumer, same type and message
(a process adds its traceback as a note). close() stops the producer; it is
also stopped when the PrefetchLoader is garbage collected or at exit.
"""

from __future__ import annotations

import copy
import multiprocessing
import pickle
import queue
import threading
import time
import traceback
import weakref

import torch

PRODUCER_NAME = "lingua_mem-data-prefetch"
POLL_S = 0.1  # how often a blocked put/get looks at the stop flag / the producer's health
STOP_S = 5.0  # how long close() waits for the producer before it kills a process


def _put(out, item, stop) -> bool:
    """Put `item`, waiting for room, unless `stop` is set first."""
    while not stop.is_set():
        try:
            out.put(item, timeout=POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _get(source, stop):
    """The next item of `source`, or None once `stop` is set."""
    while not stop.is_set():
        try:
            return source.get(timeout=POLL_S)
        except queue.Empty:
            continue
    return None


def _as_error(exc: BaseException) -> BaseException:
    """The loader is endless: a StopIteration must not end the consumer's loop quietly."""
    return RuntimeError("the data loader stopped (StopIteration)") if isinstance(exc, StopIteration) else exc


def _portable(exc: BaseException) -> BaseException:
    """`exc` as it can cross a process boundary, with its traceback as a note."""
    note = "raised in the data prefetch process:\n" + "".join(traceback.format_exception(exc)).rstrip()
    try:
        exc = pickle.loads(pickle.dumps(exc))
    except Exception:  # an exception class that does not pickle: keep its name and message
        exc = RuntimeError(f"{type(exc).__name__}: {exc}")
    if hasattr(exc, "add_note"):  # Python >= 3.11
        exc.add_note(note)
    return exc


def _produce_batches(loader, out, stop) -> None:
    """Thread producer: ("batch", batch, state, skipped) items, or one ("error", exc) item."""
    try:
        while not stop.is_set():
            batch = next(loader)
            if not _put(out, ("batch", batch, loader.state_dict(), loader.skipped), stop):
                break
    except BaseException as exc:
        _put(out, ("error", _as_error(exc)), stop)


def _produce_slots(spec, state, slots, free, out, stop) -> None:
    """Process entry point: ("batch", slot, state, skipped) items, or one ("error", exc) item."""
    torch.set_num_threads(1)  # tokenize + pack needs no intra-op threads; leave the cores to training
    try:
        loader = spec.build()
        loader.load_state_dict(state)
        while (slot := _get(free, stop)) is not None:
            for key, tensor in next(loader).items():
                slots[key][slot].copy_(tensor)
            if not _put(out, ("batch", slot, loader.state_dict(), loader.skipped), stop):
                break
    except BaseException as exc:
        _put(out, ("error", _portable(_as_error(exc))), stop)
    if stop.is_set():
        out.cancel_join_thread()  # exit now, even with items that no one will read


class ThreadProducer:
    def __init__(self, loader, depth: int):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=_produce_batches, args=(loader, self.queue, self.stop_event),
                                       name=PRODUCER_NAME, daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def get(self, timeout: float):
        return self.queue.get(timeout=timeout)

    def stop(self) -> bool:
        """Stop the thread; True when it has ended (it may be inside a slow read)."""
        self.stop_event.set()
        self.thread.join(timeout=STOP_S)
        return not self.thread.is_alive()


class ProcessProducer:
    def __init__(self, spec, state: dict, depth: int, layout: dict[str, tuple[int, ...]]):
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads (torch, CUDA, wandb)
        self.slots = {key: torch.zeros(depth, *shape, dtype=torch.long).share_memory_()
                      for key, shape in layout.items()}
        self.free, self.queue = ctx.Queue(), ctx.Queue()  # slot numbers to fill; items to take
        for slot in range(depth):
            self.free.put(slot)
        self.stop_event = ctx.Event()
        args = (spec, state, self.slots, self.free, self.queue, self.stop_event)
        self.process = ctx.Process(target=_produce_slots, args=args, name=PRODUCER_NAME, daemon=True)
        self.process.start()

    def alive(self) -> bool:
        return self.process.is_alive()

    def get(self, timeout: float):
        """The next item; a batch's slot is copied out and given back."""
        item = self.queue.get(timeout=timeout)
        if item[0] == "batch":
            slot = item[1]
            batch = {key: torch.from_numpy(s[slot].numpy().copy()) for key, s in self.slots.items()}
            self.free.put(slot)
            item = ("batch", batch, *item[2:])
        return item

    def stop(self) -> bool:
        """Stop the process: ask, drain the queue so it can exit, then terminate / kill; True when gone."""
        self.stop_event.set()
        deadline = time.monotonic() + STOP_S
        while self.process.is_alive() and time.monotonic() < deadline:
            try:
                while True:
                    self.queue.get_nowait()
            except (queue.Empty, OSError, EOFError, pickle.UnpicklingError):
                pass
            self.process.join(timeout=0.05)
        for end in (self.process.terminate, self.process.kill):
            if self.process.is_alive():
                end()
                self.process.join(timeout=STOP_S)
        for q in (self.queue, self.free):
            q.cancel_join_thread()
            q.close()
        return not self.process.is_alive()


class PrefetchLoader:
    """A loader's batches made ahead by a thread or a process; the same interface as the loader.

    `loader` is the consumer's loader (a PackedLoader): the thread runs it; a
    process builds its own from `spec` (a LoaderSpec), and `loader` checks
    states and gives the initial one and the batch layout. The producer
    starts at the first next().
    """

    def __init__(self, loader, mode: str = "thread", depth: int = 8, spec=None):
        assert mode in ("thread", "process") and depth > 0
        assert mode == "thread" or spec is not None, "a process prefetcher needs a LoaderSpec"
        self.loader, self.mode, self.depth, self.spec = loader, mode, depth, spec
        self._state, self._skipped = loader.state_dict(), loader.skipped  # as of the last batch consumed
        self._producer = None
        self._finalizer = None  # stops the producer: at close(), on garbage collection, at exit

    @property
    def skipped(self) -> dict[str, int]:
        """Bad records skipped per source in this rank's share, as of the last batch consumed."""
        return dict(self._skipped)

    @property
    def truncated(self) -> int:
        """Documents cut to data.max_doc_tokens, as of the last batch consumed."""
        return int(self._state.get("truncated", 0))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._producer is None:
            self._start()
        item = self._get()
        if item[0] == "error":
            self._stop()
            raise item[1]
        _, batch, self._state, self._skipped = item
        return batch

    def _start(self) -> None:
        if self.mode == "thread":
            self.loader.load_state_dict(self._state)  # back to the last batch consumed
            producer = ThreadProducer(self.loader, self.depth)
        else:
            producer = ProcessProducer(self.spec, self._state, self.depth, self.loader.batch_layout())
        self._producer = producer
        self._finalizer = weakref.finalize(self, producer.stop)

    def _get(self):
        while True:
            try:
                return self._producer.get(POLL_S)
            except queue.Empty:
                if self._producer.alive():
                    continue
            try:  # it ended: anything it sent just before?
                return self._producer.get(1.0)
            except queue.Empty:
                self._stop()
                raise RuntimeError(f"the data prefetch {self.mode} ended without a batch or an error") \
                    from None

    def _stop(self) -> bool:
        stopped = self._finalizer() if self._finalizer is not None else True
        self._producer = self._finalizer = None
        return stopped is not False

    def state_dict(self) -> dict:
        """The loader state after the last batch consumed (the initial or loaded state before any)."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state` (checked now); a running producer is stopped and restarts from it."""
        if not self._stop() and self.mode == "thread":
            raise RuntimeError("the data prefetch thread did not stop: cannot load a state into its loader")
        self.loader.load_state_dict(state)
        self._state, self._skipped = self.loader.state_dict(), self.loader.skipped

    def close(self) -> None:
        """Stop the producer (promptly: at most a read or a batch in progress) and close the files."""
        if self._stop():
            self.loader.close()
