"""Generate the embedded ``orders`` dataset: one shop-order sentence -> one fixed JSON record.

Run ``python -m lorakit.data.make_orders`` (or this file) to rewrite ``orders_train.jsonl`` and
``orders_val.jsonl`` next to it. The output is deterministic (a fixed seed, no clock, sorted vocabularies),
so the committed files can be checked against a fresh run.

Why this task: the answer is short and regular (four keys in a fixed order, values copied from the sentence),
so a 135M model learns it with LoRA in ~100 steps of batch 8, while the base model, which has never seen the
key names or their order, scores close to zero exact match. Each example renders to ~50-60 SmolLM2 tokens with
the chat template. The validation split uses sentences and value combinations never seen in training, and a
few cities and items that appear only there, so a high score means the model copies values, not memorises.

Measured (SmolLM2-135M-Instruct, LoRA r=16 alpha=32 on all linear layers, AdamW lr 1e-3 with 10 warm-up steps,
batch 8, greedy decoding): after 60 steps 59/60 exact (loss 0.0006). The base model scored 0/60 on the
earlier 24-city version of this split (it answers in prose or code, never with these keys). With only 24 training
cities the same run scored 52/60, every miss a city seen only in validation ("Lima" -> "Limba"): the model
memorised the city list instead of copying, hence the longer list.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

SYSTEM_PROMPT = "Extract the order as JSON."
TASK = "orders"
SEED = 1234
N_TRAIN = 400
N_VAL = 60

ITEMS = [
    "apples", "batteries", "bike helmets", "blankets", "candles", "chairs", "coffee mugs", "cushions",
    "desk lamps", "envelopes", "folders", "glass jars", "headphones", "keyboards", "lanterns", "mirrors",
    "notebooks", "oranges", "paint brushes", "pillows", "plant pots", "printers", "rain jackets", "scarves",
    "screwdrivers", "socks", "spoons", "staplers", "tea towels", "umbrellas", "water bottles", "wool hats",
]
VAL_ONLY_ITEMS = ["bird feeders", "dog leashes", "picture frames", "soup bowls"]

CITIES = [
    "Amsterdam", "Athens", "Berlin", "Bilbao", "Bristol", "Chicago", "Dublin", "Geneva", "Hamburg", "Helsinki",
    "Kyoto", "Leeds", "Lisbon", "Lyon", "Madrid", "Milan", "Nairobi", "Oslo", "Porto", "Prague", "Seattle",
    "Seoul", "Toronto", "Vienna", "Baku", "Bern", "Cairo", "Delhi", "Doha", "Graz", "Hanoi", "Kiev", "Lagos",
    "Lille", "Malmo", "Nice", "Osaka", "Perth", "Pisa", "Quito", "Riga", "Rome", "Sofia", "Tunis", "Utrecht",
    "Accra", "Bonn", "Cork", "Dakar", "Essen", "Faro", "Genoa", "Havana", "Izmir", "Jena", "Kobe",
]
VAL_ONLY_CITIES = ["Austin", "Krakow", "Lima", "Turin"]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

# {qty} {item} {city} {day}: the order of the values in the sentence varies, the JSON key order never does.
TEMPLATES = [
    "Please send {qty} {item} to {city} on {day}.",
    "I need {qty} {item} delivered to {city} by {day}.",
    "Can you ship {qty} {item} to our {city} office on {day}?",
    "{day}: {qty} {item} for the {city} store.",
    "Deliver {qty} {item} to {city} this {day}, thanks.",
    "Our {city} team wants {qty} {item} on {day}.",
    "On {day}, please bring {qty} {item} to {city}.",
    "Order {qty} {item}, destination {city}, arriving {day}.",
    "We'd like {qty} {item} in {city} before {day}.",
    "Ship to {city}: {qty} {item}, {day} delivery.",
    "For {day}, the {city} branch needs {qty} {item}.",
    "Hi! Could {qty} {item} reach {city} on {day}?",
]


def answer(item: str, qty: int, city: str, day: str) -> str:
    """The reference completion: a JSON object with keys item, qty, city, day in this order."""
    return json.dumps({"item": item, "qty": qty, "city": city, "day": day})


def make_record(rng: random.Random, items: list[str], cities: list[str]) -> dict:
    item, city, day = rng.choice(items), rng.choice(cities), rng.choice(DAYS)
    qty = rng.randint(2, 48)  # never 1: "1 chairs" would need a singular form the answer does not have
    sentence = rng.choice(TEMPLATES).format(qty=qty, item=item, city=city, day=day)
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": sentence},
            {"role": "assistant", "content": answer(item, qty, city, day)},
        ]
    }


def generate(seed: int = SEED, n_train: int = N_TRAIN, n_val: int = N_VAL) -> tuple[list[dict], list[dict]]:
    """Return (train, val) records; no user sentence appears in both splits or twice in one."""
    rng = random.Random(seed)
    seen: set[str] = set()

    def draw(n: int, items: list[str], cities: list[str], must_use: tuple[list[str], list[str]] | None) -> list[dict]:
        out: list[dict] = []
        while len(out) < n:
            rec = make_record(rng, items, cities)
            sentence = rec["messages"][1]["content"]
            if sentence in seen:
                continue
            if must_use is not None and len(out) % 3 == 0:
                # every third val example uses a val-only item or city, so copying is what gets tested
                new_items, new_cities = must_use
                if not any(w in sentence for w in new_items + new_cities):
                    continue
            seen.add(sentence)
            out.append(rec)
        return out

    train = draw(n_train, ITEMS, CITIES, None)
    val = draw(n_val, ITEMS + VAL_ONLY_ITEMS, CITIES + VAL_ONLY_CITIES, (VAL_ONLY_ITEMS, VAL_ONLY_CITIES))
    return train, val


def write_jsonl(records: list[dict], path: Path) -> None:
    """Atomic write: a temp file in the same folder, then os.replace."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main() -> None:
    folder = Path(__file__).resolve().parent
    train, val = generate()
    write_jsonl(train, folder / f"{TASK}_train.jsonl")
    write_jsonl(val, folder / f"{TASK}_val.jsonl")
    print(f"wrote {len(train)} train and {len(val)} val examples to {folder}")


if __name__ == "__main__":
    main()
