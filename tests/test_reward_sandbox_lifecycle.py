"""The reward sandbox's processes: started ahead of time (warm), and gone when their trainer is.

The trainer is a real child process here; it is killed with SIGKILL (no atexit, no cleanup),
the way an out-of-memory kill or `kill -9` ends a run. A forked grandchild that keeps the
trainer's ends of the sandbox's pipes open stands in for the checkpoint writer of issue 17.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

GONE_WITHIN_S = 10.0  # the zygote polls its parent every 0.5 s; checkers die with it (slack: loaded CI)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids, bound: float) -> list[int]:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


_TRAINER = textwrap.dedent("""
    import json, os, sys, time
    from agro_megatron.rewards.sandbox import get_pool

    pool = get_pool()
    assert pool.check([("\\\\sqrt{8}", "2\\\\sqrt{2}")] * 2, timeout_s=60.0, workers=2) == [True, True]
    holder = 0
    if sys.argv[1] == "fork":  # like the checkpoint writer: inherits every fd, outlives the trainer
        holder = os.fork()
        if holder == 0:
            time.sleep(120)
            os._exit(0)
    print(json.dumps({"zygote": pool._zygote.proc.pid, "checkers": pool.worker_pids(), "holder": holder}),
          flush=True)
    time.sleep(120)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kill -9 and /proc semantics are Linux's")
@pytest.mark.parametrize("holder", ["fork", "none"])
def test_sandbox_processes_die_with_a_killed_trainer(holder):
    trainer = subprocess.Popen([sys.executable, "-c", _TRAINER, holder], stdout=subprocess.PIPE, text=True)
    info = {}
    try:
        info = json.loads(trainer.stdout.readline())
        sandbox = [info["zygote"], *info["checkers"]]
        assert len(sandbox) == 3 and all(_alive(p) for p in sandbox)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        left = _wait_gone(sandbox, GONE_WITHIN_S)
        assert not left, f"sandbox processes {left} outlived their killed trainer by {GONE_WITHIN_S} s"
        if info["holder"]:
            assert _alive(info["holder"])  # the fd holder was alive all along: EOF never came
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        for pid in ([info.get("holder")] if info.get("holder") else []):
            try:
                os.kill(pid, signal.SIGKILL)  # the grandchild this test made the trainer fork
            except ProcessLookupError:
                pass


_FIRST_CHECK = textwrap.dedent("""
    import json, sys, time
    from agro_megatron.rewards import is_equivalent, warm
    t = time.monotonic()
    warm(workers=1)
    started = time.monotonic() - t
    t = time.monotonic()
    hostile = is_equivalent("9^{9^{9^{9}}}", "1", timeout_s=float(sys.argv[1]))
    first = time.monotonic() - t
    t = time.monotonic()
    legit = is_equivalent("\\\\sqrt{8}", "2\\\\sqrt{2}", timeout_s=30.0)
    print(json.dumps({"started": started, "first": first, "legit_s": time.monotonic() - t,
                      "hostile": hostile, "legit": legit}))
""")


def test_first_check_in_a_fresh_process_meets_the_time_limit_after_warm():
    """warm() takes the start-up (the zygote's SymPy import and warm-up, seconds) out of the first
    check: in a fresh process, the first hostile check ends at its deadline like every later one."""
    limit = 0.5
    out = subprocess.run([sys.executable, "-c", _FIRST_CHECK, str(limit)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["hostile"] is False and r["legit"] is True
    # deadline + killing and re-forking one checker (milliseconds) + slack for a loaded 2-core CI box
    assert r["first"] < limit + 2.0, r


def test_warm_in_the_background_serves_checks_that_arrive_meanwhile():
    code = textwrap.dedent("""
        import json
        from agro_megatron.rewards import is_equivalent, warm
        from agro_megatron.rewards.sandbox import get_pool
        thread = warm(workers=2, wait=False)
        verdict = is_equivalent("\\\\frac{\\\\pi}{2}", "\\\\frac{1}{2}\\\\pi", timeout_s=60.0)
        thread.join(120)
        print(json.dumps({"verdict": verdict, "alive": thread.is_alive(), "checkers": len(get_pool().worker_pids())}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"verdict": True, "alive": False, "checkers": 2}
