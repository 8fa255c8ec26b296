"""Hard time limits for answer checking: checker processes that are killed at a deadline.

SymPy can run for hours or exhaust memory on a short hostile answer (``2^{2^{2^{2^{2^{2^2}}}}}``,
``(10^{10})!``), and a Python thread cannot be interrupted. ``signal.alarm`` (math-verify's
mechanism) works only on the main thread of the main interpreter and fails elsewhere, which
silently scores everything 0 in trainers that run rewards in threads. So every symbolic check
runs in a checker process; the trainer waits on the checkers' pipes with ``poll`` and a
deadline per check, and a checker that misses its deadline is SIGKILLed and replaced by a fresh
fork of the zygote (``worker.py``). No signals are used in the trainer process, so this works
from any thread; the zygote is started with ``subprocess`` (not ``multiprocessing``), so it also
works inside daemonic processes and inherits nothing (CUDA contexts, open files) from the
trainer. Messages are JSON lines: nothing a checker sends back is ever unpickled.
"""
from __future__ import annotations

import atexit
import itertools
import json
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

STARTUP_TIMEOUT_S = 120.0
_BOOT = "import sys; from agro_megatron.rewards.worker import zygote_main; zygote_main(int(sys.argv[1]))"
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_IDS = itertools.count()


class _Zygote:
    """Client of the zygote process: forks checkers, kills and reaps them on request."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.err = tempfile.TemporaryFile()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(theirs.fileno())], pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.err, env=env,
            start_new_session=True,  # a Ctrl-C in the trainer's terminal is the trainer's to handle
        )
        theirs.close()
        self.sock = ours
        self.sock.settimeout(STARTUP_TIMEOUT_S)
        try:
            ready = self.sock.recv(16)
        except OSError:
            ready = b""
        if ready != b"R":
            err = self._stderr_tail()
            self.close()
            raise RuntimeError("the reward sandbox's zygote process failed to start within "
                               f"{STARTUP_TIMEOUT_S:.0f} s; its stderr:\n{err}")
        self.sock.settimeout(30.0)

    def _stderr_tail(self) -> str:
        try:
            self.err.seek(0)
            return self.err.read()[-4000:].decode(errors="replace")
        except (OSError, ValueError):
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def spawn(self) -> tuple[int, int, int]:
        """Fork a checker: (pid, fd to write requests to, fd to read verdicts from)."""
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        try:
            socket.send_fds(self.sock, [b"S"], [req_r, resp_w])
            reply = self.sock.recv(16)
        except OSError:
            reply = b""
        finally:
            os.close(req_r)
            os.close(resp_w)
        if len(reply) != 4:
            os.close(req_w)
            os.close(resp_r)
            raise OSError("the reward sandbox's zygote stopped answering")
        return struct.unpack("!i", reply)[0], req_w, resp_r

    def reap(self, pid: int) -> None:
        """Kill checker ``pid`` (if still running) and release its pid."""
        try:
            self.sock.send(b"K" + struct.pack("!i", pid))
            self.sock.recv(16)
        except OSError:
            pass  # zygote gone: its orphans exit on EOF and are reaped by init

    def close(self) -> None:
        self.sock.close()  # EOF: the zygote exits
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.err.close()


class _Checker:
    def __init__(self, zygote: _Zygote) -> None:
        self.zygote = zygote
        self.pid, self.req, self.resp = zygote.spawn()
        os.set_blocking(self.resp, False)
        self.buf = b""
        self.task: int | None = None  # index into the current batch
        self.task_id = -1
        self.deadline = 0.0
        self.gold: str | None = None  # ground truth of its current group of tasks

    def send(self, obj: dict) -> bool:
        data = (json.dumps(obj) + "\n").encode()
        try:
            while data:
                data = data[os.write(self.req, data):]
            return True
        except OSError:  # BrokenPipeError: the checker died
            return False

    def read(self) -> tuple[list[dict], bool]:
        """(complete messages available now, whether the checker has exited)."""
        chunks, eof = [], False
        while True:
            try:
                chunk = os.read(self.resp, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                eof = True
                break
            chunks.append(chunk)
        self.buf += b"".join(chunks)
        *lines, self.buf = self.buf.split(b"\n")
        out = []
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict):
                out.append(msg)
        return out, eof

    def close(self) -> None:
        for fd in (self.req, self.resp):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.zygote.alive():
            self.zygote.reap(self.pid)
        # else: an orphan (someone killed the zygote) sees EOF, or hits its CPU limit, and exits


class SandboxPool:
    """Checker processes that decide (pred, gold) pairs of canonical answers under a deadline."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._zygote: _Zygote | None = None
        self._checkers: list[_Checker] = []
        # checks, cpu_s (checker CPU seconds of completed checks), timeouts, crashes, blocked,
        # restarts
        self.stats: Counter = Counter()

    def _new_checker(self) -> _Checker:
        for attempt in range(2):
            if self._zygote is None or not self._zygote.alive():
                if self._zygote is not None:
                    self._zygote.close()
                self._zygote = _Zygote()
            try:
                return _Checker(self._zygote)
            except OSError:
                if attempt:
                    raise
                self._zygote.proc.kill()
                self._zygote.proc.wait()
        raise AssertionError("unreachable")

    def _replace(self, i: int) -> None:
        self._checkers[i].close()
        self._checkers[i] = self._new_checker()
        self.stats["restarts"] += 1

    def check(self, pairs: list[tuple[str, str]], timeout_s: float, workers: int,
              op: str = "eq") -> list[bool | None]:
        """Verdict per pair: True/False, or None when the check timed out, crashed or was blocked.

        ``timeout_s`` bounds each check's wall time from when a checker receives it.
        Safe to call from any thread; concurrent callers are served one batch at a time.
        """
        with self._lock:
            while len(self._checkers) < workers:
                self._checkers.append(self._new_checker())
            active = list(range(workers))
            results: list[bool | None] = [None] * len(pairs)
            # Tasks grouped by ground truth, and a checker keeps to one group while it can: its
            # parse of that ground truth (and SymPy's caches) are reused instead of rebuilt in
            # every checker.
            pending: dict[str, list[int]] = {}
            for k in range(len(pairs) - 1, -1, -1):
                pending.setdefault(pairs[k][1], []).append(k)
            try:
                while True:
                    for i in active:
                        if self._checkers[i].task is None and pending:
                            self._dispatch(i, self._next_task(i, active, pending), pairs, op,
                                           timeout_s)
                    busy = [i for i in active if self._checkers[i].task is not None]
                    if not busy:
                        return results
                    poller = select.poll()
                    by_fd = {self._checkers[i].resp: i for i in busy}
                    for fd in by_fd:
                        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
                    wait = min(self._checkers[i].deadline for i in busy) - time.monotonic()
                    for fd, _ in poller.poll(max(0, int(wait * 1000) + 1)):
                        self._on_readable(by_fd[fd], results)
                    now = time.monotonic()
                    for i in busy:
                        if self._checkers[i].task is not None and now >= self._checkers[i].deadline:
                            self.stats["timeouts"] += 1
                            self._replace(i)
            finally:
                # An interrupted batch (exception, KeyboardInterrupt) must not leave a checker
                # busy with a task whose answer the next batch would wait for.
                for i in active:
                    if i < len(self._checkers) and self._checkers[i].task is not None:
                        self._replace(i)

    def _next_task(self, i: int, active: list[int], pending: dict[str, list[int]]) -> int:
        c = self._checkers[i]
        if c.gold not in pending:  # its group is done: take one no other checker works on
            claimed = {self._checkers[j].gold for j in active if j != i}
            c.gold = next((g for g in pending if g not in claimed), next(iter(pending)))
        group = pending[c.gold]
        k = group.pop()
        if not group:
            del pending[c.gold]
        return k

    def _dispatch(self, i: int, k: int, pairs: list, op: str, timeout_s: float) -> None:
        pred, gold = pairs[k]
        for _ in range(2):  # a checker that died while idle is noticed here: retry on a fresh one
            c = self._checkers[i]
            c.task, c.task_id, c.deadline = k, next(_IDS), time.monotonic() + timeout_s
            if c.send({"id": c.task_id, "op": op, "pred": pred, "gold": gold,
                       "timeout_s": timeout_s}):
                return
            c.task = None
            self.stats["crashes"] += 1
            self._replace(i)
        # twice refused: the verdict stays None (scores 0.0)

    def _on_readable(self, i: int, results: list) -> None:
        c = self._checkers[i]
        msgs, eof = c.read()
        for msg in msgs:
            if msg.get("id") == c.task_id and c.task is not None:
                self.stats["checks"] += 1
                self.stats["cpu_s"] += float(msg.get("cpu_s", 0.0))
                blocked = int(msg.get("blocked", 0))
                self.stats["blocked"] += blocked
                results[c.task] = None if blocked else bool(msg.get("eq"))
                c.task = None
                eof = eof or bool(msg.get("fatal"))  # MemoryError: the checker exits
        if eof:  # exited: after a MemoryError, or it crashed (segfault, CPU limit, killed)
            if c.task is not None:
                self.stats["crashes"] += 1
            self._replace(i)

    def warm(self, workers: int) -> None:
        """Start the zygote (SymPy import and warm-up, seconds) and `workers` idle checkers now,
        so that the first check is as fast as the rest."""
        with self._lock:
            while len(self._checkers) < workers:
                self._checkers.append(self._new_checker())

    def worker_pids(self) -> list[int]:
        return [c.pid for c in self._checkers]

    def close(self) -> None:
        """Stop all processes (they hold no state worth a graceful exit)."""
        with self._lock:
            for c in self._checkers:
                c.close()
            if self._zygote is not None:
                self._zygote.close()
            self._checkers, self._zygote = [], None


_POOL: SandboxPool | None = None
_POOL_PID = -1
_POOL_LOCK = threading.Lock()


def get_pool() -> SandboxPool:
    """The process-wide pool; a forked child gets its own instead of its parent's checkers."""
    global _POOL, _POOL_PID, _POOL_LOCK
    if _POOL_PID != os.getpid():
        _POOL_LOCK = threading.Lock()  # a lock held during fork would never be released
        _POOL, _POOL_PID = None, os.getpid()
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = SandboxPool()
        return _POOL


def _close_at_exit() -> None:
    if _POOL is not None and _POOL_PID == os.getpid():
        _POOL.close()


atexit.register(_close_at_exit)
