"""The processes behind ``sandbox.py``: a zygote that forks hardened answer checkers.

The zygote imports SymPy and the LaTeX parser once and warms them up (~1 s), then forks a
checker whenever the trainer asks for one (a few ms), so a checker killed at its deadline is
replaced at once.

Both die with their parent, however it dies (kill -9 included), even when a process the trainer
forked (a checkpoint writer) still holds the trainer's ends of their pipes, so EOF never comes:
the zygote checks twice a second that its parent is still the trainer, and every checker has
the kernel SIGKILL it when the zygote exits (PR_SET_PDEATHSIG; the zygote is single-threaded, so
"the thread that forked it" is the zygote itself).

The zygote also reaps its checkers, but only when the trainer asks: a dead checker's pid then
stays reserved until the trainer has stopped using it, so a kill can never hit an unrelated
process that reused the pid.

A checker reads JSON requests and writes JSON verdicts on two pipes, and defends itself on top
of the parser's own guarantees:
* an address-space limit (MemoryError instead of swapping the host) and a CPU-time limit per
  check (the kernel ends a checker stuck after its trainer died);
* an audit hook (PEP 578) that raises on process creation, networking, ctypes, file writes and
  on compiling any source text except numeric literals (what the LaTeX grammar passes to
  ``sympy.Number``) and code libraries generate from their own templates. A check during which
  the hook fired scores False, so even a library that ``sympify``-ed model text could not run it.
"""
from __future__ import annotations

import json
import os
import re
import socket
import struct
import sys
import time

WORKER_MEMORY_HEADROOM = 2 << 30
"""Bytes of address space a checker may allocate beyond what the zygote held."""

_DENIED_EVENTS = (
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
    "os.killpg", "os.remove", "os.unlink", "os.rmdir", "os.rename", "os.mkdir", "os.chmod",
    "os.chown", "os.truncate", "os.symlink", "os.link", "os.putenv", "os.unsetenv", "os.chdir",
    "subprocess.", "socket.", "ctypes.", "shutil.", "urllib.", "http.", "ftplib.", "smtplib.",
    "webbrowser.", "pty.", "sys.addaudithook", "code.", "cpython.run_",
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# What sympy.parse_expr makes of a numeric literal: "Integer (12 )", "Float ('1.5e-3' )".
_NUMERIC_NAMES = re.compile(r"\b(?:Integer|Float|Rational)\b")
_NUMERIC_CODE = re.compile(r"[\s()0-9.eE+\-'\",*/]*")
# Library files allowed to compile code they generate from their own templates or annotations.
_CODEGEN_FILES = ("sympy/polys/monomials.py", "dataclasses.py", "collections/__init__.py",
                  "typing.py")
# Common answer shapes, checked once in the zygote: every forked checker inherits the warm
# parser (ANTLR's prediction cache) and SymPy caches instead of building them itself.
_WARMUP = (
    ("0.5", "\\frac{1}{2}"), ("(x+1)^2", "x^2+2x+1"), ("(x - 2)(x + 3)", "x^2 + x - 7"),
    ("(1,2]", "(1,2]"), ("(-\\infty, -1) \\cup (1, \\infty)", "x^2 > 1"), ("2 \\le x < 7", "[2, 7)"),
    ("\\{1,2\\}", "\\{2,1\\}"), ("1, -2, 3", "\\{3, 1, -2\\}"), ("(-3, \\frac{1}{2})", "(-3, 0.5)"),
    ("\\sqrt{8}", "2\\sqrt{2}"), ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{\\sqrt{3}}"), ("x<3", "(-\\infty,3)"),
    ("\\frac{5\\pi}{6}", "\\frac{5}{6}\\pi"), ("3 + 4i", "4i + 3"), ("y = 2x + 1", "2x + 1"),
    ("\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ("\\log_2 8", "3"), ("\\binom{5}{2}", "10"), ("\\text{odd}", "odd"),
)


class _Guard:
    blocked = 0


def _compile_allowed(source, filename) -> bool:
    if isinstance(filename, (str, bytes)) and not os.fsdecode(filename).startswith("<"):
        return True  # a module file being imported
    if isinstance(source, (bytes, bytearray)):
        source = bytes(source).decode("utf-8", "replace")
    if not isinstance(source, str):
        import ast

        try:
            source = ast.unparse(source)
        except Exception:
            return False
    if source.strip() == "from sympy import *" or (
            len(source) < 4096 and _NUMERIC_CODE.fullmatch(_NUMERIC_NAMES.sub("", source))):
        return True
    frame = sys._getframe(2)
    parsing = codegen = False
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if name.startswith("<frozen importlib"):
            return True  # module-level code of a library being imported (sympy.physics.units)
        parsing = parsing or name.endswith("sympy/parsing/sympy_parser.py")
        codegen = codegen or name.endswith(_CODEGEN_FILES)
        frame = frame.f_back
    # Text on its way into sympify/parse_expr from a check: only numeric literals may pass.
    return codegen and not parsing


def _audit(event: str, args: tuple) -> None:
    if event == "compile":
        if _compile_allowed(args[0], args[1]):
            return
    elif event == "open":
        mode, flags = (tuple(args) + (None, None))[1:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS)
        if not writing:
            return
    elif not event.startswith(_DENIED_EVENTS):
        return
    _Guard.blocked += 1
    raise RuntimeError(f"reward sandbox: {event} is not allowed while checking an answer")


def _limit_memory() -> None:
    try:
        import resource

        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        limit = vm + WORKER_MEMORY_HEADROOM
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, OSError, ValueError, StopIteration):
        pass  # not Linux: the trainer's deadline still bounds each check


def _limit_cpu(timeout_s: float) -> None:
    try:
        import resource

        used = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(used.ru_utime + used.ru_stime + 2 * timeout_s + 2)
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    except (ImportError, OSError, ValueError):
        pass


def _probe_sympify(text: str) -> bool:
    """Test hook: what if a library sympify-ed model text? (The guard must block it.)"""
    import sympy

    sympy.sympify(text)
    return True


def _serve(req_fd: int, resp_fd: int) -> None:
    """A checker's life: harden, then answer requests until the trainer closes the pipe."""
    from agro_megatron.rewards import symbolic

    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # stray prints / warnings go nowhere; the protocol has its own pipes
        os.dup2(devnull, fd)
    out = os.fdopen(resp_fd, "wb", buffering=0)  # opened before the guard forbids writing
    inp = os.fdopen(req_fd, "rb")
    _limit_memory()
    sys.addaudithook(_audit)
    for line in inp:
        try:
            msg = json.loads(line)
            task_id = msg["id"]
        except (ValueError, KeyError, TypeError):
            continue
        _Guard.blocked = 0
        fatal = eq = False
        start = time.process_time()
        try:
            _limit_cpu(float(msg.get("timeout_s", 5.0)))
            if msg.get("op") == "probe_sympify":
                eq = _probe_sympify(str(msg["pred"]))
            else:
                eq = symbolic.equivalent(str(msg["pred"]), str(msg["gold"]))
        except MemoryError:
            fatal = True
        except BaseException:  # noqa: BLE001 - any failure of a check is a non-match
            pass
        reply = {"id": task_id, "eq": bool(eq) and not _Guard.blocked,
                 "blocked": _Guard.blocked, "fatal": fatal, "cpu_s": time.process_time() - start}
        out.write((json.dumps(reply) + "\n").encode())
        if fatal:  # memory may be fragmented or a cache half-built: start from a clean fork
            return


PARENT_POLL_S = 0.5
"""How often an idle zygote checks that the trainer that started it is still alive."""


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this (just forked) process when its parent exits (Linux); if the
    parent is already gone, exit now."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass  # not Linux: the checker still exits on EOF or at its CPU limit
    if os.getppid() != parent:  # died between fork and prctl
        os._exit(0)


def zygote_main(sock_fd: int) -> None:
    """Entry point of the zygote process (started by ``sandbox._Zygote``)."""
    parent = os.getppid()
    sock = socket.socket(fileno=sock_fd)
    import sympy.physics.units  # noqa: F401 - imported lazily by some checks; sympifies at import

    from agro_megatron.rewards import symbolic

    for pred, gold in _WARMUP:  # lazy imports and caches happen once, here, not in every checker
        symbolic.equivalent(pred, gold)
    import ctypes  # noqa: F401 - loaded once here, used by every forked checker (_die_with_parent)

    sock.sendall(b"R")
    sock.settimeout(PARENT_POLL_S)
    me = os.getpid()
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 16, 2)
        except TimeoutError:
            if os.getppid() != parent:
                break  # the trainer is gone (its forks may keep our socket open): checkers die with us
            continue
        except OSError:
            break
        if not msg:
            break  # the trainer is gone; idle checkers see EOF on their pipes and exit too
        if msg[:1] == b"S" and len(fds) == 2:
            pid = os.fork()
            if pid == 0:
                try:
                    _die_with_parent(me)
                    sock.close()
                    _serve(fds[0], fds[1])
                finally:
                    os._exit(0)
            for fd in fds:
                os.close(fd)
            sock.sendall(struct.pack("!i", pid))
        elif msg[:1] == b"K" and len(msg) == 5:
            (pid,) = struct.unpack("!i", msg[1:5])
            try:
                os.kill(pid, 9)  # still our unreaped child: the pid cannot have been reused
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            sock.sendall(b"k")
        else:
            for fd in fds:
                os.close(fd)
            sock.sendall(b"?")
    # Exit at once: an interpreter shutdown with SymPy loaded takes seconds on a loaded machine,
    # and the checkers' parent-death signal fires only when this process is gone.
    os._exit(0)
