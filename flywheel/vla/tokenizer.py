"""The instruction tokenizer: a word-level vocabulary that ships with the code (no hub download).

Words are lower-cased and split on anything that is not a letter or digit. Unknown words map to ``<unk>`` rather
than failing, so a new phrasing degrades gracefully instead of crashing a run. Output is fixed-length, padded with
``<pad>`` (id 0) and a mask, so batches need no collation logic.
"""

from __future__ import annotations

import re

import numpy as np

SPECIALS = ("<pad>", "<unk>")
# Every word the built-in tasks use, plus common phrasings a user might type. Order is part of the checkpoint
# format: append, never reorder.
WORDS = (
    "push put place move slide pick drop the a an block cube onto on into in to pad bowl "
    "red green blue yellow purple orange black white left right of and "
    # the task suite (issue 3): stacking, buttons, drawers, sorting, and their phrasings
    "stack set top press hit down button open close closed shut pull out up it drawer sort each every same its "
    "colour blocks bowls by"
).split()


class Tokenizer:
    def __init__(self, max_len: int = 12):
        self.max_len = int(max_len)
        self.vocab = list(SPECIALS) + list(WORDS)
        self._ids = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.unk_id = 0, 1

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @staticmethod
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", text.lower())

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(w, self.unk_id) for w in self.words(text)][: self.max_len]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] for i in ids if i != self.pad_id)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (ids int64 (B, L), mask bool (B, L)); True marks a real token."""
        ids = np.zeros((len(texts), self.max_len), np.int64)
        for row, text in enumerate(texts):
            enc = self.encode(text)
            ids[row, : len(enc)] = enc
        return ids, ids != self.pad_id
