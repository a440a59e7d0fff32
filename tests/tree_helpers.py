"""Random prefix trees of token sequences, shared by the tree-packing tests."""

from __future__ import annotations

import random


def random_tree_sequences(rng: random.Random, vocab: int, max_sequences: int = 40) -> list[list[int]]:
    """Sequences of a random group: a prompt, then 1-4 levels of blocks (branching 1-5, some blocks empty, so
    some sequences end where others go on), then probes forked mid-block from a random sequence."""
    depth = rng.randint(1, 4)
    out: list[list[int]] = []

    def grow(prefix: list[int], level: int) -> None:
        if level == depth:
            out.append(prefix)
            return
        for _ in range(rng.randint(1, 5)):
            if len(out) >= max_sequences:
                return
            block = [rng.randrange(vocab) for _ in range(rng.choice([0, rng.randint(1, 6)]))]
            grow(prefix + block, level + 1)

    grow([rng.randrange(vocab) for _ in range(rng.randint(1, 8))], 0)
    for _ in range(rng.randint(0, 3)):
        src = rng.choice(out)
        cut = rng.randint(1, len(src))
        out.append(src[:cut] + [rng.randrange(vocab) for _ in range(rng.randint(0, 5))])
    rng.shuffle(out)
    return out
