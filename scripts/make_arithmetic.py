"""Write arithmetic.jsonl: worked arithmetic explanations, a small FineMath stand-in.

Public domain by construction: every problem and its explanation is generated here from a fixed
seed, so the same command always writes the same file (the one shipped beside input.txt).

    python scripts/make_arithmetic.py [--out arithmetic.jsonl] [--problems 2500] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from smollm2.files import write_atomic

NAMES = ["Ada", "Ben", "Cleo", "Dev", "Emma", "Finn", "Gus", "Hana", "Ivo", "Jun", "Kira", "Leo"]
THINGS = ["apples", "marbles", "books", "coins", "stamps", "pencils", "shells", "cards"]


def digits_sum(a: int, b: int) -> str:
    """Column addition, one place at a time, with the carries said."""
    lines, carry, place = [], 0, 0
    names = ["ones", "tens", "hundreds", "thousands", "ten-thousands"]
    while a or b or carry:
        x, y = a % 10, b % 10
        total = x + y + carry
        said = f"{x} + {y}" + (f" + {carry} carried" if carry else "")
        lines.append(f"{names[place]}: {said} = {total}, write {total % 10}" + (", carry 1" if total >= 10 else ""))
        carry, a, b, place = total // 10, a // 10, b // 10, place + 1
    return "\n".join(lines)


def addition(rng: random.Random) -> str:
    a, b = rng.randint(10, 9999), rng.randint(10, 9999)
    return f"Problem: What is {a} + {b}?\nAdd column by column.\n{digits_sum(a, b)}\nAnswer: {a} + {b} = {a + b}."


def subtraction(rng: random.Random) -> str:
    a, b = sorted((rng.randint(10, 9999), rng.randint(10, 9999)), reverse=True)
    return (
        f"Problem: What is {a} - {b}?\nCheck by adding back: {b} + {a - b} = {a}.\n"
        f"{digits_sum(b, a - b)}\nAnswer: {a} - {b} = {a - b}."
    )


def multiplication(rng: random.Random) -> str:
    a, b = rng.randint(12, 999), rng.randint(2, 99)
    tens, ones = divmod(b, 10)
    steps = [f"{a} x {ones} = {a * ones}"]
    if tens:
        steps.append(f"{a} x {tens * 10} = {a * tens * 10}")
        steps.append(f"{a * tens * 10} + {a * ones} = {a * b}")
    return f"Problem: What is {a} x {b}?\nSplit {b} into tens and ones.\n" + "\n".join(steps) + f"\nAnswer: {a * b}."


def division(rng: random.Random) -> str:
    b = rng.randint(2, 12)
    q, r = rng.randint(3, 400), rng.randint(0, b - 1)
    a = b * q + r
    rest = f" with remainder {r}" if r else " exactly"
    return (
        f"Problem: Divide {a} by {b}.\n{b} x {q} = {b * q}, and {a} - {b * q} = {r}, which is less than {b}.\n"
        f"Answer: {a} / {b} = {q}{rest}."
    )


def story(rng: random.Random) -> str:
    name, other = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    have, boxes, per_box, give = rng.randint(3, 60), rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 20)
    bought = boxes * per_box
    total = have + bought
    give = min(give, total)
    return (
        f"Problem: {name} has {have} {thing}. {name} buys {boxes} boxes of {per_box} {thing} each, "
        f"then gives {give} to {other}. How many {thing} does {name} have now?\n"
        f"The boxes hold {boxes} x {per_box} = {bought} {thing}.\n"
        f"After buying: {have} + {bought} = {total}.\n"
        f"After giving: {total} - {give} = {total - give}.\n"
        f"Answer: {name} has {total - give} {thing}."
    )


def fraction(rng: random.Random) -> str:
    d = rng.choice([2, 3, 4, 5, 6, 8, 10])
    n = rng.randint(1, d - 1)
    whole = d * rng.randint(2, 30)
    part = whole // d * n
    return (
        f"Problem: What is {n}/{d} of {whole}?\nFirst find 1/{d}: {whole} / {d} = {whole // d}.\n"
        f"Then take {n} of those: {whole // d} x {n} = {part}.\nAnswer: {part}."
    )


KINDS = [addition, subtraction, multiplication, division, story, fraction]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="arithmetic.jsonl")
    parser.add_argument("--problems", type=int, default=2500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    lines = [json.dumps({"text": rng.choice(KINDS)(rng)}) for _ in range(args.problems)]
    write_atomic(Path(args.out), "\n".join(lines) + "\n")  # as make_conversations.py: never half a file


if __name__ == "__main__":
    main()
