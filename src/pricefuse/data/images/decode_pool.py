"""Decode untrusted image bytes in a few killable worker processes.

Why processes, not threads: an image can be small in bytes and still take long to decode (a
progressive JPEG of empty refinement scans over a 6320x6320 canvas: 2 KB for 1 s of CPU in
`prepare_image`, 100 KB for ~50 s; tests/unit/test_decode_pool.py builds one), and PIL decodes
inside one C call that nothing can interrupt from another thread: a thread given a deadline can
only stop *waiting* while the decode runs on. A process can be killed at its deadline
(SIGKILL), and the decode dies with it.

Why one pool for the whole process: the server decodes in many request threads at once, and
each hostile image would otherwise hold a core. Here at most `workers` decodes run at any moment
however many threads ask; a request that finds no free decoder before its deadline is turned
away (`decode_busy`) instead of queueing without bound; a decode past `seconds` is cut
(`decode_timeout`).

Why `spawn`: the serving process runs torch/OpenMP threads, and a plain `fork` of a threaded
process can inherit a held lock and deadlock in the child. `spawn` starts a fresh interpreter
that imports this module (so `pricefuse.data.images` and PIL, nothing of the model stack);
multiprocessing also re-imports the parent's `__main__` there, so a program using the pool must
keep its `__main__` import-safe (`if __name__ == "__main__":`), as multiprocessing always
requires. A worker starts in ~0.3 s, once, not per image (a replacement after a kill starts while
the error goes back). Each worker caps its own address space (`RLIMIT_AS`, `memory_limit`): a
decode that tries to allocate far more than a `fetch.max_pixels` image needs (~0.4 GB at 40 Mpx)
fails with MemoryError (-> `undecodable`) instead of pushing the host into swap or the OOM killer.

Two jobs: `prepare` (`validate.prepare_image`: the bytes to cache) and `decode`
(`validate.decoded_image`: the pixels serving prices with, shipped back raw, so the parent never
decodes the caller's bytes itself). Worker replies are plain bytes (a JSON header and the
payload), never pickles: the worker handles attacker-chosen data, so the parent does not
unpickle what it sends back.
"""

from __future__ import annotations

import atexit
import json
import logging
import multiprocessing
import multiprocessing.util  # registers its exit hook now, so the pools' hooks run before it
import os
import queue
import signal
import struct
import threading
import time
import weakref
from typing import Any, get_args

from PIL import Image

from pricefuse.core.config import FetchConfig
from pricefuse.data.images.validate import (
    ImageRejected,
    PreparedImage,
    RejectKind,
    decoded_image,
    prepare_image,
)

log = logging.getLogger(__name__)

DEFAULT_MEMORY_LIMIT = 3 << 30  # bytes of address space per worker; a 40 Mpx decode needs < 1 GiB
START_TIMEOUT = 60.0  # seconds a new worker may take to import PIL and report ready
_KINDS = frozenset(get_args(RejectKind))
_HEADER = struct.Struct(">I")


# --- the worker process ----------------------------------------------------------------------


def _limit_memory(limit: int | None) -> None:
    if not limit:
        return
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        if soft == resource.RLIM_INFINITY or soft > limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, ValueError) as exc:  # not on this platform: run without
        log.debug("decode worker runs without a memory ceiling: %s", exc)


def _reply(meta: dict[str, Any], data: bytes = b"") -> bytes:
    header = json.dumps(meta).encode()
    return _HEADER.pack(len(header)) + header + data


def _run_job(job: str, data: bytes, cfg: FetchConfig) -> bytes:
    """One job's reply: `prepare` -> the PreparedImage; `decode` -> `decoded_image`'s pixels."""
    if job == "decode":
        image = decoded_image(data, cfg)
        return _reply(
            {"status": "ok", "mode": image.mode, "size": list(image.size)}, image.tobytes()
        )
    prepared = prepare_image(data, cfg)
    meta = {
        "status": "ok",
        "ext": prepared.ext,
        "size": list(prepared.size),
        "source_size": list(prepared.source_size),
        "format": prepared.format,
    }
    return _reply(meta, prepared.data)


def _worker_main(conn: Any, memory_limit: int | None) -> None:
    """A worker's whole life: report ready, then run one job at a time until the pipe closes.

    The parent sends `(job, data, cfg)`; the reply is `_reply(...)` bytes. Exits on EOF, i.e.
    when the parent closes its end or dies, so a worker never outlives the server for long.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle, not ours
    _limit_memory(memory_limit)
    conn.send_bytes(_reply({"status": "ready", "pid": os.getpid()}))
    while True:
        try:
            job, data, cfg = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply = _run_job(job, data, cfg)
        except ImageRejected as exc:
            reply = _reply({"status": "rejected", "kind": exc.kind, "message": str(exc)})
        except BaseException as exc:  # MemoryError, a PIL bug...: the parent replaces us
            reply = _reply({"status": "error", "message": f"{type(exc).__name__}: {exc}"})
        del data
        try:
            conn.send_bytes(reply)
        except OSError:
            return


# --- the parent side -------------------------------------------------------------------------


class _WorkerGone(Exception):
    """The worker's pipe closed: it died (killed, OOM) or never started."""


class _Worker:
    """One decoder process and the parent's end of its pipe; used by one thread at a time."""

    def __init__(self, ctx: Any, memory_limit: int | None) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=_worker_main,
            args=(child, memory_limit),
            name="pricefuse-decode",
            daemon=True,
        )
        self.process.start()
        child.close()  # only the worker holds it now: its death reads as EOF here
        self.ready = False
        self.stopped = False
        self.started = time.monotonic()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def alive(self) -> bool:
        return not self.stopped and self.process.exitcode is None

    def wait_ready(self, timeout: float) -> bool:
        """True once the worker reported ready; False if `timeout` passed first."""
        if self.ready:
            return True
        if not self.conn.poll(max(0.0, timeout)):
            return False
        meta, _ = self.receive(1 << 16)
        if meta.get("status") != "ready":
            raise _WorkerGone(f"unexpected first message {meta!r}")
        self.ready = True
        return True

    def receive(self, maxlength: int) -> tuple[dict[str, Any], bytes]:
        try:
            message = self.conn.recv_bytes(maxlength)
        except (EOFError, OSError) as exc:
            raise _WorkerGone(str(exc) or type(exc).__name__) from exc
        try:
            (size,) = _HEADER.unpack_from(message)
            meta = json.loads(message[_HEADER.size : _HEADER.size + size])
        except (struct.error, ValueError) as exc:
            raise _WorkerGone(f"malformed reply: {exc}") from exc
        if not isinstance(meta, dict):
            raise _WorkerGone("malformed reply")
        return meta, message[_HEADER.size + size :]

    def stop(self) -> None:
        """SIGKILL and reap: the worker holds nothing worth a graceful exit. Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        if self.process.pid is not None:
            self.process.kill()
            self.process.join(5)
            if self.process.exitcode is not None:
                self.process.close()
        self.conn.close()


def _stop_all(
    live: set[_Worker], lock: threading.Lock, closed: threading.Event, owner: int
) -> None:
    """Finalizer (pool collected, `close`, interpreter exit): no worker outlives its pool, and
    none starts after (a request thread still running at exit would otherwise replace one)."""
    if os.getpid() != owner:  # a forked copy of the pool: these workers are not ours
        return
    closed.set()
    locked = lock.acquire(timeout=5)
    try:
        workers = list(live)
        live.clear()
    finally:
        if locked:
            lock.release()
    for worker in workers:
        try:
            worker.stop()
        except Exception as exc:
            log.debug("stopping decode worker %s: %s", worker.pid, exc)


class DecodePool:
    """At most `workers` decodes at once, each in its own process and cut after `seconds`.

    `prepare(data, cfg, deadline)` is `prepare_image(data, cfg)` run in a worker process, and
    `decode(...)` is `decoded_image(data, cfg)`: same results, same `ImageRejected` kinds and
    messages, plus `decode_busy` (no worker free
    before `deadline`) and `decode_timeout` (the decode ran past `seconds`, or past the
    deadline; its worker is killed and replaced). A worker that dies or fails in any other way
    gives `undecodable` and is replaced. Thread-safe; workers start lazily (or all at once with
    `warm()`); `close()` (also run at interpreter exit) kills them.
    """

    def __init__(
        self,
        workers: int,
        seconds: float,
        *,
        memory_limit: int | None = DEFAULT_MEMORY_LIMIT,
        start_method: str = "spawn",
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if seconds <= 0:
            raise ValueError(f"seconds must be > 0, got {seconds}")
        if start_method == "fork":
            raise ValueError("fork is unsafe in a threaded server: use spawn or forkserver")
        self.workers = workers
        self.seconds = float(seconds)
        self._memory_limit = memory_limit
        self._ctx = multiprocessing.get_context(start_method)
        self._owner = os.getpid()
        self._stopped = threading.Event()  # set by close() and by the finalizer at exit
        self._lock = threading.Lock()
        # A slot per allowed decode: an idle worker, or None where one is yet to start.
        self._idle: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(workers):
            self._idle.put(None)
        self._live: set[_Worker] = set()
        self._finalizer = weakref.finalize(
            self, _stop_all, self._live, self._lock, self._stopped, self._owner
        )
        # At exit, before multiprocessing's own hook (registered earlier, so run later): that
        # one SIGTERMs the workers without marking the pool closed, and a request thread still
        # running could start a replacement in between.
        atexit.register(self._finalizer)

    # -- public -----------------------------------------------------------------------------

    def prepare(
        self, data: bytes, cfg: FetchConfig, deadline: float | None = None
    ) -> PreparedImage:
        """`prepare_image(data, cfg)` in a worker; `deadline` is absolute `time.monotonic()`."""
        meta, payload = self._submit("prepare", data, cfg, deadline)
        try:
            return PreparedImage(
                payload,
                str(meta["ext"]),
                _size(meta["size"]),
                _size(meta["source_size"]),
                str(meta["format"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ImageRejected("undecodable", f"malformed decoder reply: {exc}") from None

    def decode(self, data: bytes, cfg: FetchConfig, deadline: float | None = None) -> Image.Image:
        """`decoded_image(data, cfg)` in a worker: the prepared image's pixels (RGB or RGBA, at
        most `max_side` on a side), rebuilt here from raw bytes, so nothing of the caller's
        data is decoded in this process. Limits and errors as `prepare`."""
        meta, payload = self._submit("decode", data, cfg, deadline)
        try:
            mode, size = str(meta["mode"]), _size(meta["size"])
            if mode not in _PIXEL_BYTES or len(payload) != _PIXEL_BYTES[mode] * size[0] * size[1]:
                raise ValueError(f"{mode} {size} with {len(payload)} bytes")
            return Image.frombytes(mode, size, payload)
        except (KeyError, TypeError, ValueError) as exc:
            raise ImageRejected("undecodable", f"malformed decoder reply: {exc}") from None

    def _submit(
        self, job: str, data: bytes, cfg: FetchConfig, deadline: float | None
    ) -> tuple[dict[str, Any], bytes]:
        """Run `job` on a worker: wait for a free one until `deadline`, then at most `seconds`
        (and not past `deadline`) for its answer; the reply's header and payload."""
        self._check_owner()
        worker = self._acquire(deadline)
        try:
            for attempt in range(2):
                worker = self._running(worker)
                self._wait_ready(worker, deadline)
                wait = self.seconds if deadline is None else deadline - time.monotonic()
                wait = min(wait, self.seconds)
                if wait <= 0:  # nothing sent, so nothing to kill: the worker stays
                    raise _Replaced(
                        worker,
                        ImageRejected("decode_busy", "request deadline passed before decode"),
                    )
                try:
                    worker.conn.send((job, data, cfg))
                except OSError as exc:  # it died after the liveness check: the job never left
                    if attempt:
                        raise self._replace(
                            worker, ImageRejected("decode_busy", f"image decoder unusable: {exc}")
                        ) from None
                    self._discard(worker)
                    worker = None
                    continue
                return self._result(worker, _reply_limit(job, data, cfg), wait)
            raise AssertionError("unreachable")
        except _Replaced as replaced:
            worker = replaced.worker
            raise replaced.error from None
        finally:
            self._release(worker)

    def warm(self, timeout: float = START_TIMEOUT) -> None:
        """Start every worker now and wait until each is ready (e.g. when a model loads)."""
        self._check_owner()
        deadline = time.monotonic() + timeout
        held: list[_Worker | None] = []
        index = 0
        try:
            for _ in range(self.workers):
                held.append(self._acquire(deadline))
            for index in range(len(held)):  # start them all, then wait: they import at once
                held[index] = self._running(held[index])
            for index in range(len(held)):
                worker = held[index] = self._running(held[index])
                self._wait_ready(worker, deadline)
        except _Replaced as replaced:
            held[index] = replaced.worker
            raise replaced.error from None
        finally:
            for slot in held:
                self._release(slot)

    def pids(self) -> list[int]:
        """The PIDs of the worker processes currently running (for monitoring and tests)."""
        with self._lock:
            return sorted(w.pid for w in self._live if w.pid is not None and w.alive())

    def idle(self) -> int:
        """How many decoders are free right now (for monitoring and tests)."""
        return self._idle.qsize()

    def close(self) -> None:
        """Kill every worker; later calls raise `decode_busy`."""
        self._finalizer()
        atexit.unregister(self._finalizer)

    @property
    def closed(self) -> bool:
        return self._stopped.is_set()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- slots and workers ------------------------------------------------------------------

    def _check_owner(self) -> None:
        if os.getpid() != self._owner:
            raise RuntimeError("a DecodePool cannot be used across fork; use shared_pool()")

    def _acquire(self, deadline: float | None) -> _Worker | None:
        if self.closed:
            raise ImageRejected("decode_busy", "image decoder is shut down")
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            slot = self._idle.get(timeout=timeout)
        except queue.Empty:
            raise ImageRejected(
                "decode_busy",
                f"all {self.workers} image decoders busy until the request deadline",
            ) from None
        if self.closed:
            self._release(slot)
            raise ImageRejected("decode_busy", "image decoder is shut down")
        return slot

    def _release(self, worker: _Worker | None) -> None:
        if self.closed and worker is not None:
            self._discard(worker)
            worker = None
        self._idle.put(worker)

    def _start(self) -> _Worker:
        with self._lock:
            if self.closed:
                raise ImageRejected("decode_busy", "image decoder is shut down")
            worker = _Worker(self._ctx, self._memory_limit)
            self._live.add(worker)
        return worker

    def _discard(self, worker: _Worker) -> None:
        with self._lock:
            self._live.discard(worker)
        worker.stop()

    def _replace(self, worker: _Worker, error: ImageRejected) -> _Replaced:
        """Kill `worker`, start its successor (it imports while the error travels back)."""
        self._discard(worker)
        if self.closed:  # killed by `close`, most likely: say so rather than blame the image
            return _Replaced(None, ImageRejected("decode_busy", "image decoder is shut down"))
        try:
            successor: _Worker | None = self._start()
        except Exception as exc:  # cannot start one now: the next caller tries again
            log.error("cannot start an image decode worker: %s", exc)
            successor = None
        return _Replaced(successor, error)

    def _running(self, slot: _Worker | None) -> _Worker:
        """`slot`'s worker if it is alive, else a newly started one."""
        if slot is not None:
            if slot.alive():
                return slot
            if self.closed:
                raise _Replaced(None, ImageRejected("decode_busy", "image decoder is shut down"))
            log.warning("image decode worker %s died while idle; replacing it", slot.pid)
            self._discard(slot)
        try:
            return self._start()
        except ImageRejected as exc:
            raise _Replaced(None, exc) from None
        except Exception as exc:  # e.g. no more processes: the next caller tries again
            log.error("cannot start an image decode worker: %s", exc)
            raise _Replaced(
                None, ImageRejected("decode_busy", f"cannot start an image decoder: {exc}")
            ) from None

    def _wait_ready(self, worker: _Worker, deadline: float | None) -> None:
        """Return once `worker` has started; its start-up does not count against `seconds`."""
        limit = worker.started + START_TIMEOUT
        until = limit if deadline is None else min(deadline, limit)
        try:
            if worker.wait_ready(until - time.monotonic()):
                return
        except _WorkerGone as gone:
            raise self._replace(
                worker, ImageRejected("decode_busy", f"image decoder failed to start: {gone}")
            ) from None
        if time.monotonic() >= limit:
            raise self._replace(
                worker,
                ImageRejected("decode_busy", f"image decoder not ready in {START_TIMEOUT:g}s"),
            )
        raise _Replaced(  # still starting: it stays for the next caller
            worker,
            ImageRejected("decode_busy", "image decoder still starting at the request deadline"),
        )

    def _result(self, worker: _Worker, maxlength: int, wait: float) -> tuple[dict[str, Any], bytes]:
        """Wait `wait` seconds at most for the reply to the job just sent to `worker`."""
        try:
            if not worker.conn.poll(wait):
                raise self._replace(
                    worker,
                    ImageRejected(
                        "decode_timeout",
                        f"image decode took longer than {wait:.2f}s (limit {self.seconds:g}s)",
                    ),
                )
            meta, payload = worker.receive(maxlength)
        except (_WorkerGone, OSError) as exc:
            if not self.closed:
                log.warning("image decode worker %s died mid-decode: %s", worker.pid, exc)
            raise self._replace(
                worker, ImageRejected("undecodable", f"image decoder died: {exc}")
            ) from None
        status = meta.get("status")
        if status == "ok":
            return meta, payload
        if status == "rejected" and meta.get("kind") in _KINDS:
            raise _Replaced(worker, ImageRejected(meta["kind"], str(meta.get("message", ""))))
        log.warning("image decode worker %s failed: %s", worker.pid, meta.get("message"))
        raise self._replace(
            worker, ImageRejected("undecodable", f"image decode failed: {meta.get('message')}")
        )


class _Replaced(Exception):
    """Internal: the error to raise, and the worker (or None) that goes back to the slot."""

    def __init__(self, worker: _Worker | None, error: ImageRejected) -> None:
        super().__init__(str(error))
        self.worker = worker
        self.error = error


def _size(value: Any) -> tuple[int, int]:
    width, height = value
    return int(width), int(height)


_PIXEL_BYTES = {"RGB": 3, "RGBA": 4}  # the modes `decoded_image` returns


def _reply_limit(job: str, data: bytes, cfg: FetchConfig) -> int:
    """The longest reply a job may send: the caller's bytes back, or `decode`'s pixels."""
    if job == "decode":
        pixels = cfg.max_side**2 if cfg.max_side > 0 else cfg.max_pixels
        return 4 * pixels + (1 << 16)
    return max(cfg.max_bytes, len(data)) + (16 << 20)


# --- one pool per process --------------------------------------------------------------------

_SHARED: dict[tuple[int, float], DecodePool] = {}
_SHARED_LOCK = threading.Lock()


def shared_pool(workers: int, seconds: float) -> DecodePool:
    """The process's pool for (`workers`, `seconds`), created on first use.

    Every request of a served model (and every model instance with the same limits) shares it,
    so the bound on concurrent decodes holds process-wide. A forked child gets its own.
    """
    key = (int(workers), float(seconds))
    with _SHARED_LOCK:
        pool = _SHARED.get(key)
        if pool is None or pool.closed:
            pool = _SHARED[key] = DecodePool(workers, seconds)
        return pool


def _forget_shared() -> None:
    _SHARED.clear()  # the parent's pools (and their workers) are not this child's


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_shared)
