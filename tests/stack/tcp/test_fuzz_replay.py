"""Replay the fuzz corpus and a batch of seeded random inputs through the harness."""

from __future__ import annotations

import pathlib
import random

from fuzz.tcp_connection import TestOneInput

CORPUS = pathlib.Path(__file__).parents[3] / "fuzz" / "corpus" / "tcp_connection"


def test_corpus_and_random_inputs_raise_nothing() -> None:
    seeds = sorted(CORPUS.iterdir())
    assert seeds
    for path in seeds:
        TestOneInput(path.read_bytes())
    rng = random.Random(7)
    for _ in range(300):
        TestOneInput(rng.randbytes(rng.randrange(300)))
