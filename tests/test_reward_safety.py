"""Hostile model output: no code execution, hard time limits from any thread, process unharmed."""
import os
import resource
import subprocess
import sys
import threading
import time

import pytest

from agro_megatron.rewards import configure, is_equivalent, score, score_batch
from agro_megatron.rewards.sandbox import get_pool

LIMIT = 0.5
# Allowance for a loaded CI machine (2 cores shared by the whole suite).
SLACK = 8.0


@pytest.fixture(scope="module", autouse=True)
def warm_sandbox():
    """Start the sandbox before any timing: the first start imports SymPy (~1 s)."""
    assert get_pool().check([("\\sqrt{8}", "2\\sqrt{2}")] * 2, timeout_s=60.0, workers=2) == [True] * 2


def _payloads(marker: str) -> list[str]:
    cmd = f"touch {marker}"
    return [
        f"__import__('os').system('{cmd}')",
        f"__import__(\"os\").system(\"{cmd}\")",
        f"eval(\"__import__('os').system('{cmd}')\")",
        f"\\text{{__import__('os').system('{cmd}')}}",
        f"\\operatorname{{__import__}}('os').system('{cmd}')",
        f"\\mathrm{{exec}}(\"import os; os.system('{cmd}')\")",
        f"\\frac{{__import__('os').system('{cmd}')}}{{2}}",
        f"\\boxed{{().__class__.__bases__[0].__subclasses__()}}",
        f"x = __import__('subprocess').run(['touch', '{marker}'])",
        f"\\sqrt{{__import__('os').system('{cmd}')}} + 1",
        f"$\\lambda: __import__('os').system('{cmd}')$",
    ]


@pytest.mark.parametrize("i", range(len(_payloads("m"))))
def test_code_in_answers_is_never_executed(tmp_path, i):
    marker = tmp_path / "pwned"
    payload = _payloads(str(marker))[i]
    assert score(f"Let me think. The final answer is {payload}", "1") == 0.0
    assert is_equivalent("1", payload) is False  # hostile ground truth too
    assert score_batch([f"\\boxed{{{payload}}}"], ["2"], timeout_s=LIMIT) == [0.0]
    assert not marker.exists()


def test_payload_is_live_and_the_worker_guard_blocks_it(tmp_path):
    """The payload really runs under plain sympify; inside a worker the audit hook stops it."""
    live, guarded = tmp_path / "live", tmp_path / "guarded"
    code = f"import sympy; sympy.sympify(\"__import__('os').system('touch {live}')\")"
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=60)
    assert live.exists()  # the test can fail: this payload executes when sympified
    pool = get_pool()
    blocked = pool.stats["blocked"]
    payload = f"__import__('os').system('touch {guarded}')"
    assert pool.check([(payload, "")], timeout_s=10.0, workers=1, op="probe_sympify") == [None]
    assert pool.stats["blocked"] > blocked
    assert not guarded.exists()
    assert is_equivalent("\\sqrt{8}", "2\\sqrt{2}")  # legitimate checks never trip the guard
    assert pool.stats["blocked"] == blocked + 1


EXPENSIVE = [
    "2^{2^{2^{2^{2^{2^{2}}}}}}",
    "2^2^2^2^2^2^2",
    "9^{9^{9^{9}}}",
    "(10^{10})!",
    "100000!",
    "\\operatorname{zeros}(100000, 100000)",
    "\\prod_{k=1}^{10^{9}} k",
    "x" * 999,
    "(" * 5000 + "1" + ")" * 5000,
    "{1+" * 30 + "1" + "}" * 30,
    "\\{" * 14 + "1" + "\\}" * 14,
    "\\sqrt{" * 12 + "2" + "}" * 12,
    "1" * 5000,
]


def test_expensive_answers_score_zero_within_the_limit():
    pool = get_pool()
    timeouts = pool.stats["timeouts"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.monotonic()
    assert is_equivalent(EXPENSIVE[0], "1", timeout_s=LIMIT) is False
    assert time.monotonic() - t < LIMIT + SLACK
    responses = [f"So the final answer is ${a}$." for a in EXPENSIVE]
    t = time.monotonic()
    assert score_batch(responses, ["1"] * len(EXPENSIVE), timeout_s=LIMIT, workers=2) == [0.0] * len(EXPENSIVE)
    # Every check stopped at its deadline (plus a replacement worker's start-up now and then).
    assert time.monotonic() - t < len(EXPENSIVE) * LIMIT + SLACK
    assert pool.stats["timeouts"] >= timeouts + 3  # the hard limit was actually exercised
    # The trainer process is unharmed: little memory growth, and checking still works.
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) * 1024 < 200 << 20
    assert is_equivalent("(x+1)^2", "x^2+2x+1", timeout_s=10.0)


def test_megabyte_response_is_cheap():
    long_answer = "The final answer is " + "9" * (1 << 20)
    parens = "(" * (1 << 20)
    long_text = "x" * (4 << 20) + " The final answer is 5."
    t = time.monotonic()
    assert score(long_answer, "9") == 0.0  # over the answer length cap
    assert score(parens, "1") == 0.0
    assert score(long_text, "5") == 1.0
    assert time.monotonic() - t < 3.0  # milliseconds: only the tail is scanned, nothing parsed


def test_timeout_from_a_worker_thread():
    """signal.alarm cannot work off the main thread; the process sandbox must."""
    out = {}

    def run():
        t = time.monotonic()
        out["hostile"] = score_batch(["The final answer is $9^{9^{9^{9}}}$"], ["1"], timeout_s=LIMIT)
        out["elapsed"] = time.monotonic() - t
        out["correct"] = score_batch(["The final answer is $\\sqrt{8}$."], ["2\\sqrt{2}"],
                                     timeout_s=10.0)

    th = threading.Thread(target=run)
    th.start()
    th.join(LIMIT + SLACK + 15)
    assert not th.is_alive()
    assert out["hostile"] == [0.0] and out["elapsed"] < LIMIT + SLACK
    assert out["correct"] == [1.0]  # not "everything scores 0 in threads"


def test_score_in_threads_uses_the_default_limit():
    old = configure()["timeout_s"]
    configure(timeout_s=LIMIT)
    try:
        results = {}

        def run(k, response, gold):
            results[k] = score(response, gold)

        jobs = [("tower", "The final answer is $2^{2^{2^{2^{2^{2^{2}}}}}}$.", "4"),
                ("sqrt", "The final answer is $\\frac{\\sqrt{2}}{2}$.", "\\frac{1}{\\sqrt{2}}"),
                ("poly", "The final answer is $(x-1)(x+1)$.", "x^2-1"),
                ("wrong", "The final answer is $\\sqrt{3}$.", "\\sqrt{2}")]
        threads = [threading.Thread(target=run, args=job) for job in jobs]
        t = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert time.monotonic() - t < 4 * (LIMIT + SLACK)
        assert results == {"tower": 0.0, "sqrt": 1.0, "poly": 1.0, "wrong": 0.0}
    finally:
        configure(timeout_s=old)


def test_a_crashed_worker_scores_zero_and_is_replaced():
    pool = get_pool()
    crashes = pool.stats["crashes"]
    out = {}
    th = threading.Thread(target=lambda: out.setdefault(
        "r", is_equivalent("9^{9^{9^{9}}}", "1", timeout_s=30.0)))
    th.start()
    deadline = time.monotonic() + 20
    busy = []
    while not busy and time.monotonic() < deadline:
        busy = [c for c in list(pool._checkers) if c.task is not None]
        time.sleep(0.05)
    assert busy, "no worker picked up the check"
    os.kill(busy[0].pid, 9)
    th.join(20)
    assert out["r"] is False and pool.stats["crashes"] == crashes + 1
    assert is_equivalent("\\frac{\\pi}{2}", "\\frac{1}{2}\\pi", timeout_s=10.0)


def test_workers_exit_when_the_parent_dies():
    code = ("import time; from agro_megatron.rewards import is_equivalent; "
            "from agro_megatron.rewards.sandbox import get_pool; "
            "is_equivalent('\\\\sqrt{8}', '2\\\\sqrt{2}'); "
            "print(get_pool().worker_pids()[0], flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return  # exited; waiting for a reaper
        except FileNotFoundError:
            return
        time.sleep(0.1)
    pytest.fail("an idle worker outlived its parent")
