"""Throughput of the MATH reward: score_batch with 2 sandbox workers vs a loop of score().

2,000 synthetic but realistic responses (500 prompts x 4 samples, step-by-step text ending in
"The final answer is X", some boxed instead), about half correct, answers written in a form
that often differs from the ground truth (0.5 vs \\frac{1}{2}, 2\\sqrt{2} vs \\sqrt{8},
expanded vs factored polynomials, intervals, tuples, sets, multiples of pi). Every verdict is
compared with the generator's label. Each timed run starts with fresh checker processes and an
empty verdict cache.

    python benchmarks/reward.py [--n 2000] [--workers 2] [--seed 0] [--repeats 3]

Last line: ``answers_per_s=<score_batch rate> speedup=<vs the score() loop>``.
"""
from __future__ import annotations

import argparse
import random
import time
from fractions import Fraction

from agro_megatron.rewards import clear_cache, score, score_batch
from agro_megatron.rewards.sandbox import get_pool


def _frac(q: Fraction) -> str:
    if q.denominator == 1:
        return str(q.numerator)
    sign = "-" if q < 0 else ""
    return f"{sign}\\frac{{{abs(q.numerator)}}}{{{q.denominator}}}"


def _problem(rng: random.Random):
    """(ground truth, equivalent renderings, wrong renderings)."""
    kind = rng.choice(["int", "frac", "decimal", "sqrt", "pi", "poly", "interval", "tuple", "set"])
    if kind == "int":
        n = rng.randint(-50, 2000)
        same = [str(n), f"{n:,}" if abs(n) >= 1000 else f"{n}.0", f"x = {n}"]
        return str(n), same, [str(n + rng.choice([-2, -1, 1, 10])), str(-n or 1)]
    if kind in ("frac", "decimal"):
        q = Fraction(rng.randint(-30, 30) or 1, rng.choice([2, 4, 5, 8, 10, 3, 6, 7]))
        k = rng.randint(2, 4)
        same = [_frac(q), f"\\dfrac{{{q.numerator * k}}}{{{q.denominator * k}}}",
                f"{q.numerator}/{q.denominator}"]
        if 10**6 % q.denominator == 0:
            same.append(str(float(q)))
        wrong = [_frac(q + Fraction(1, q.denominator)), _frac(-q), f"{float(q):.2f}1"]
        return (str(float(q)) if kind == "decimal" and 10**6 % q.denominator == 0 else _frac(q)), same, wrong
    if kind == "sqrt":
        a, b = rng.randint(2, 9), rng.choice([2, 3, 5, 6, 7])
        same = [f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{a * a * b}}}", f"\\sqrt{{{b}}} \\cdot {a}"]
        return f"{a}\\sqrt{{{b}}}", same, [f"{a + 1}\\sqrt{{{b}}}", f"\\sqrt{{{a * b}}}", str(a * b)]
    if kind == "pi":
        q = Fraction(rng.randint(1, 12), rng.choice([1, 2, 3, 4, 6]))
        g = f"\\frac{{{q.numerator}\\pi}}{{{q.denominator}}}" if q.denominator > 1 else f"{q.numerator}\\pi"
        same = [g, f"{_frac(q)}\\pi", f"\\pi \\cdot {_frac(q)}"]
        return g, same, [f"{_frac(q * 2)}\\pi", _frac(q), f"{float(q) * 3.14:.2f}"]
    if kind == "poly":
        r, s = rng.randint(-6, 6), rng.randint(-6, 6)
        b, c = -(r + s), r * s
        expanded = f"x^2 + {b}x + {c}".replace("+ -", "- ")
        factored = f"(x - {r})(x - {s})".replace("- -", "+ ")
        return expanded, [expanded, factored], [f"x^2 + {b}x + {c + 1}".replace("+ -", "- "),
                                                f"(x + {r})(x - {s})".replace("+ -", "- ")]
    if kind == "interval":
        lo, hi = sorted(rng.sample(range(-10, 10), 2))
        lb, rb = rng.choice("[("), rng.choice("])")
        g = f"{lb}{lo}, {hi}{rb}"
        same = [g, f"\\left{lb}{lo},{hi}\\right{rb}", f"{lb}{lo}, {hi}{rb}".replace(" ", "")]
        flip = {"[": "(", "(": "["}[lb]
        return g, same, [f"{flip}{lo}, {hi}{rb}", f"{lb}{lo}, {hi + 1}{rb}"]
    if kind == "tuple":
        x, y = rng.randint(-9, 9), rng.randint(-9, 9)
        return f"({x}, {y})", [f"({x},{y})", f"\\left( {x}, {y} \\right)"], [f"({y}, {x + (x == y)})", f"({x}, {y + 1})"]
    vals = rng.sample(range(-9, 10), rng.randint(2, 4))
    g = "\\{" + ", ".join(map(str, vals)) + "\\}"
    shuffled = vals[:]
    rng.shuffle(shuffled)
    return g, [g, ", ".join(map(str, shuffled)), "\\{" + ",".join(map(str, shuffled)) + "\\}"], \
        ["\\{" + ", ".join(map(str, vals[:-1])) + "\\}", ", ".join(str(v + 1) for v in vals)]


_STEPS = ["First, we rewrite the expression in a simpler form.",
          "Next, we substitute the known values and simplify.",
          "We check the boundary cases separately.",
          "Multiplying both sides by the common denominator gives a polynomial equation.",
          "Therefore the quantity we want follows directly."]


def make_responses(n: int, seed: int):
    rng = random.Random(seed)
    responses, golds, labels = [], [], []
    while len(responses) < n:
        gold, same, wrong = _problem(rng)
        for _ in range(4):
            correct = rng.random() < 0.5
            ans = rng.choice(same if correct else wrong)
            steps = " ".join(rng.sample(_STEPS, rng.randint(2, 5)))
            body = f"Let's solve this step by step.\n{steps}\nWe obtain ${ans}$ after simplifying.\n"
            if rng.random() < 0.2:
                text = body + f"So the answer is $\\boxed{{{ans}}}$."
            else:
                text = body + f"The final answer is ${ans}$. I hope it is correct."
            responses.append(text)
            golds.append(gold)
            labels.append(1.0 if correct else 0.0)
    return responses[:n], golds[:n], labels[:n]


def _burn(n: int = 4_000_000) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def machine_parallelism(workers: int) -> float:
    """How much faster ``workers`` CPU-bound processes finish than one doing their work serially
    (``workers`` on an idle machine; less when other jobs share the cores)."""
    import multiprocessing as mp

    t = time.perf_counter()
    for _ in range(workers):
        _burn()
    serial = time.perf_counter() - t
    procs = [mp.get_context("fork").Process(target=_burn) for _ in range(workers)]
    t = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return serial / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each; the best counts")
    args = ap.parse_args()
    responses, golds, labels = make_responses(args.n, args.seed)
    pool = get_pool()
    warm_r, warm_g, _ = make_responses(8, args.seed + 1)

    def fresh() -> None:
        """New checker processes (no parse caches from the other run) and no verdict cache."""
        pool.close()
        score_batch(warm_r, warm_g, workers=args.workers)
        clear_cache()

    t_loop = t_batch = float("inf")
    cpu_loop = cpu_batch = (0.0, 0.0)
    for _ in range(args.repeats):  # alternate, keep the best of each: the machine may be shared
        fresh()
        checks, c_cpu, p_cpu = pool.stats["checks"], pool.stats["cpu_s"], time.process_time()
        t = time.perf_counter()
        loop = [score(r, g) for r, g in zip(responses, golds)]
        if time.perf_counter() - t < t_loop:
            t_loop = time.perf_counter() - t
            cpu_loop = (time.process_time() - p_cpu, pool.stats["cpu_s"] - c_cpu)
        n_symbolic = pool.stats["checks"] - checks

        fresh()
        c_cpu, p_cpu = pool.stats["cpu_s"], time.process_time()
        t = time.perf_counter()
        batch = score_batch(responses, golds, workers=args.workers)
        if time.perf_counter() - t < t_batch:
            t_batch = time.perf_counter() - t
            cpu_batch = (time.process_time() - p_cpu, pool.stats["cpu_s"] - c_cpu)

    # Reference only (unsafe: no deadline, no isolation): the same checks in this process.
    from agro_megatron.rewards import extract_answer, symbolic
    from agro_megatron.rewards.math import _quick

    t = time.perf_counter()
    memo: dict = {}
    for r, g in zip(responses, golds):
        verdict, p, q = _quick(extract_answer(r) or "", g)
        if verdict is None and (p, q) not in memo:
            memo[p, q] = symbolic.equivalent(p, q)
    t_inproc = time.perf_counter() - t

    assert batch == loop, "score_batch disagrees with score()"
    agree = sum(b == y for b, y in zip(batch, labels)) / len(labels)
    print(f"responses={len(responses)} correct_labels={int(sum(labels))} "
          f"symbolic_checks={n_symbolic} (the rest decided by normalisation / exact numbers)")
    print(f"verdicts agreeing with the generator's labels: {agree:.4f}")
    print(f"best of {args.repeats} runs each: wall clock, and CPU seconds of this process / of the "
          "checker processes (wall-clock ratios need an otherwise idle machine)")
    print(f"score() loop:            {t_loop:7.2f} s  {len(responses) / t_loop:8.1f} answers/s  "
          f"cpu {cpu_loop[0]:.2f} s + {cpu_loop[1]:.2f} s")
    print(f"score_batch(workers={args.workers}):  {t_batch:7.2f} s  {len(responses) / t_batch:8.1f} answers/s  "
          f"cpu {cpu_batch[0]:.2f} s + {cpu_batch[1]:.2f} s")
    print(f"in-process, unsandboxed: {t_inproc:7.2f} s  {len(responses) / t_inproc:8.1f} answers/s"
          "  (reference for the sandbox's overhead; one run)")
    print(f"sandbox stats: {dict(pool.stats)}")
    print(f"calibration: {args.workers} CPU-bound jobs in {args.workers} processes finish "
          f"{machine_parallelism(args.workers):.2f}x sooner than in one, on this machine right now "
          "(the ceiling for the speedup)")
    print(f"answers_per_s={len(responses) / t_batch:.1f} speedup={t_loop / t_batch:.2f}")


if __name__ == "__main__":
    main()
