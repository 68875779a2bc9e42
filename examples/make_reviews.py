"""Write the example rank lists in ``examples/`` (every sentence composed here, by us).

Each list answers one prompt ("Write a short review of the kettle.") with four reviews,
ordered from the most positive to the most negative: the sentiment rank lists of the seed
system, in English. Deterministic: ``python examples/make_reviews.py`` rewrites the same
files byte for byte.
"""

from __future__ import annotations

import random
from pathlib import Path

PRODUCTS = [
    "kettle",
    "desk lamp",
    "backpack",
    "phone case",
    "coffee grinder",
    "rain jacket",
    "blender",
    "keyboard",
    "water bottle",
    "hiking boots",
    "toaster",
    "headphones",
    "office chair",
    "frying pan",
    "bike light",
    "travel mug",
    "notebook",
    "umbrella",
    "wireless mouse",
    "sleeping bag",
    "rice cooker",
    "tent",
    "scarf",
    "electric toothbrush",
    "bookshelf",
    "alarm clock",
    "yoga mat",
    "suitcase",
    "garden hose",
    "monitor stand",
]
ASPECTS = [
    "build quality",
    "price",
    "design",
    "delivery",
    "battery",
    "size",
    "finish",
    "instructions",
    "packaging",
    "comfort",
]

# Four sentiment levels, most positive first. Fragments are combined at random.
OPENERS = [
    [
        "I love this {p}.",
        "This {p} is fantastic.",
        "Best {p} I have ever owned.",
        "Absolutely delighted with this {p}.",
    ],
    ["The {p} is pretty good.", "Decent {p} overall.", "I am fairly happy with the {p}.", "A solid {p} for the money."],
    [
        "The {p} is a bit disappointing.",
        "Not great, this {p}.",
        "I expected more from this {p}.",
        "The {p} is mediocre at best.",
    ],
    ["I hate this {p}.", "This {p} is terrible.", "Worst {p} I have bought.", "The {p} broke and I regret buying it."],
]
ASPECT_LINES = [
    [
        "The {a} is excellent.",
        "The {a} exceeded my expectations.",
        "Wonderful {a}.",
        "The {a} is superb and I would buy it again.",
    ],
    ["The {a} is fine.", "The {a} is good enough.", "Nice {a}, nothing special.", "The {a} works as described."],
    ["The {a} could be better.", "The {a} is somewhat poor.", "I am not impressed by the {a}.", "The {a} feels cheap."],
    ["The {a} is awful.", "The {a} is a complete failure.", "Horrible {a}, avoid it.", "The {a} made me return it."],
]
CLOSERS = [
    ["Highly recommended!", "Five stars.", "I will buy another one.", "Perfect gift."],
    ["Would recommend.", "Four stars.", "Good value.", "It does the job."],
    ["Two stars.", "Probably would not buy again.", "Only okay.", "Think twice before buying."],
    ["One star.", "Do not buy.", "Waste of money.", "Returning it tomorrow."],
]


def review(rng: random.Random, level: int, product: str) -> str:
    parts = [rng.choice(OPENERS[level]).format(p=product)]
    for a in rng.sample(ASPECTS, rng.randint(0, 2)):
        parts.append(rng.choice(ASPECT_LINES[level]).format(a=a))
    if rng.random() < 0.7:
        parts.append(rng.choice(CLOSERS[level]))
    return " ".join(parts)


def rank_lists(n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        product = rng.choice(PRODUCTS)
        texts = [review(rng, level, product) for level in range(4)]
        if len(set(texts)) == 4:
            rows.append([f"Write a short review of the {product}."] + texts)
    return rows


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    starts = [
        "Write a short review of the {p}.",
        "What do you think of the {p}?",
        "Review the {p} you bought last month.",
    ]
    return [rng.choice(starts).format(p=rng.choice(PRODUCTS)) for _ in range(n)]


def sft_examples(n: int, seed: int) -> list[dict[str, str]]:
    """Instruction data for SFT: a review prompt and one review of any sentiment level, so
    the SFT model writes reviews of every kind and PPO has room to move."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        product = rng.choice(PRODUCTS)
        out.append(
            {"prompt": f"Write a short review of the {product}.", "response": review(rng, rng.randrange(4), product)}
        )
    return out


def main() -> None:
    import json

    here = Path(__file__).parent
    rows = rank_lists(600, seed=7)
    (here / "reviews_ranklists.tsv").write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    all_prompts = prompts(240, seed=11)
    (here / "review_prompts.txt").write_text("".join(p + "\n" for p in all_prompts[:200]), encoding="utf-8")
    (here / "review_prompts_heldout.txt").write_text("".join(p + "\n" for p in all_prompts[200:]), encoding="utf-8")
    (here / "sft_reviews.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in sft_examples(400, seed=5)), encoding="utf-8"
    )


if __name__ == "__main__":
    main()
