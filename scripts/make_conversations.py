"""Write examples/conversations.jsonl: small question-and-answer conversations, made deterministically.

Arithmetic, opposites, counting letters and spelling backwards, asked in a few phrasings, some
with a system message and some of two exchanges: enough for a tiny model to learn the chat format
(and a little of the content) in minutes on a CPU (config/sft-tiny.yaml).

    python scripts/make_conversations.py [--out examples/conversations.jsonl] [--count 3000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from smollm2.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "light": "dark", "happy": "sad",
    "early": "late", "full": "empty", "open": "closed", "hard": "soft", "old": "new", "wet": "dry",
    "loud": "quiet", "near": "far", "rich": "poor", "strong": "weak", "high": "low", "long": "short",
}  # fmt: skip
WORDS = ["apple", "river", "garden", "pencil", "window", "castle", "planet", "music", "orange", "bridge", "candle"]
SYSTEMS = ["You are a helpful assistant.", "You answer in one short sentence.", "You are a patient teacher."]


def arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5:
        question = rng.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "How much is {a} + {b}?"])
        return question.format(a=a, b=b), f"{a} plus {b} is {a + b}."
    a, b = max(a, b), min(a, b)
    question = rng.choice(["What is {a} minus {b}?", "Subtract {b} from {a}.", "How much is {a} - {b}?"])
    return question.format(a=a, b=b), f"{a} minus {b} is {a - b}."


def opposite(rng: random.Random) -> tuple[str, str]:
    word, other = rng.choice(list(OPPOSITES.items()))
    if rng.random() < 0.5:
        word, other = other, word
    question = rng.choice(["What is the opposite of {w}?", "Give me the opposite of '{w}'.", "Opposite of {w}?"])
    return question.format(w=word), f"The opposite of {word} is {other}."


def letters(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        question = rng.choice(["How many letters are in '{w}'?", "Count the letters of {w}."])
        return question.format(w=word), f"'{word}' has {len(word)} letters."
    question = rng.choice(["Spell '{w}' backwards.", "Write {w} in reverse."])
    return question.format(w=word), f"'{word}' backwards is '{word[::-1]}'."


TOPICS = [arithmetic, opposite, letters]


def conversation(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    for _ in range(2 if rng.random() < 0.25 else 1):
        question, answer = rng.choice(TOPICS)(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "conversations.jsonl")
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    lines = [json.dumps(conversation(rng)) for _ in range(args.count)]
    write_atomic(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.count} conversations to {args.out}")


if __name__ == "__main__":
    main()
