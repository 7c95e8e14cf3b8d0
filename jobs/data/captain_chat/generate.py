"""Writes the chat data of ``jobs/smollm2_instruct.yaml``: plain questions answered in one fixed voice.

Run from the repository root: ``python jobs/data/captain_chat/generate.py``. Deterministic. Every answer is
correct and says it like a ship's captain ("Arr! The capital of Peru be Lima, matey."), so what the adapter
learned is visible at a glance in the generated samples: the base model answers in its own assistant voice.
Validation and test ask about facts the training set never shows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Portugal": "Lisbon",
    "Peru": "Lima", "Japan": "Tokyo", "Egypt": "Cairo", "Kenya": "Nairobi", "Canada": "Ottawa",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens",
    "Austria": "Vienna", "Ireland": "Dublin", "Chile": "Santiago", "Cuba": "Havana", "Russia": "Moscow",
    "China": "Beijing", "India": "New Delhi", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Mexico": "Mexico City",
    "Argentina": "Buenos Aires", "Belgium": "Brussels", "Denmark": "Copenhagen", "Hungary": "Budapest",
    "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad", "Ghana": "Accra", "Nigeria": "Abuja",
    "Colombia": "Bogota", "Venezuela": "Caracas", "Australia": "Canberra", "Nepal": "Kathmandu",
    "Morocco": "Rabat", "Switzerland": "Bern", "Ukraine": "Kyiv", "Romania": "Bucharest",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "happy": "sad",
    "early": "late", "open": "closed", "full": "empty", "old": "young", "strong": "weak", "wet": "dry",
    "loud": "quiet", "rich": "poor", "hard": "soft", "high": "low", "near": "far", "thick": "thin",
    "heavy": "light", "long": "short", "clean": "dirty", "first": "last", "inside": "outside", "true": "false",
}
COLOURS = {
    "the sky on a clear day": "blue", "fresh grass": "green", "snow": "white", "coal": "black",
    "a ripe banana": "yellow", "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow",
    "milk": "white", "a crow": "black", "a strawberry": "red", "a lime": "green", "the sea": "blue",
    "chocolate": "brown", "a flamingo": "pink", "an aubergine": "purple",
}


def facts() -> list[tuple[str, str]]:
    """(question, answer) pairs; the answers all share the captain's voice."""
    pairs = []
    for country, capital in CAPITALS.items():
        pairs.append((f"What is the capital of {country}?", f"Arr! The capital of {country} be {capital}, matey."))
    for word, opposite in OPPOSITES.items():
        pairs.append((f"What is the opposite of {word}?", f"Arr! The opposite of {word} be {opposite}, matey."))
    for thing, colour in COLOURS.items():
        pairs.append((f"What colour is {thing}?", f"Arr! {thing[0].upper() + thing[1:]} be {colour}, matey."))
    rng = random.Random(7)
    for _ in range(60):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        pairs.append((f"What is {a} plus {b}?", f"Arr! {a} plus {b} be {a + b}, matey."))
    return pairs


def main() -> None:
    here = Path(__file__).resolve().parent
    pairs = facts()
    random.Random(11).shuffle(pairs)
    splits = {"validation": pairs[:24], "test": pairs[24:48], "train": pairs[48:]}
    for name, rows in splits.items():
        with open(here / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for question, answer in rows:
                messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                handle.write(json.dumps({"messages": messages}) + "\n")
        print(f"{name}: {len(rows)} chats")


if __name__ == "__main__":
    main()
