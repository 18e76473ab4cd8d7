"""What the built-in tasks say: instruction templates per task family, and the splits that measure generalisation.

Two kinds of held-out language, both fixed by the code (never by chance), so that "held-out" means the same thing
in every run:

- **Phrasings.** Every family has several templates. The first is the *canonical* one, the only one the shipped base
  was trained on. The last is held out: ``phrasing="train"`` uses all but it, ``"heldout"`` only it.
- **Combinations.** A combination is what an instruction names: the family, the colours and (for drawers) the verb.
  About a quarter of them are held out (``combo_is_heldout``): a policy trained on ``combos="train"`` has seen every
  colour and every family, but never these pairings.
"""

from __future__ import annotations

import zlib

# Fields: {b} the named object's colour, {t} the target's colour. The first template is the canonical one, the last
# the held-out one.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "push": (
        "push the {b} block onto the {t} pad",
        "slide the {b} block onto the {t} pad",
        "push the {b} cube to the {t} pad",
        "move the {b} block onto the {t} pad",
    ),
    "place": (
        "put the {b} block in the {t} bowl",
        "place the {b} cube into the {t} bowl",
        "pick up the {b} block and put it in the {t} bowl",
        "drop the {b} block into the {t} bowl",
    ),
    "stack": (
        "put the {b} block on the {t} block",
        "stack the {b} block on the {t} block",
        "place the {b} cube on top of the {t} cube",
        "set the {b} block onto the {t} block",
    ),
    "button": (
        "press the {b} button",
        "push the {b} button",
        "press down the {b} button",
        "hit the {b} button",
    ),
    "open": (
        "open the {b} drawer",
        "pull the {b} drawer open",
        "pull out the {b} drawer",
        "slide the {b} drawer open",
    ),
    "close": (
        "close the {b} drawer",
        "push the {b} drawer shut",
        "shut the {b} drawer",
        "slide the {b} drawer closed",
    ),
    "sort": (
        "put each block in the bowl of its colour",
        "sort the blocks into the bowls by colour",
        "put every block in the bowl of the same colour",
        "sort the blocks by colour",
    ),
    "stow": (  # {b}: the block, {t}: the drawer
        "put the {b} block in the {t} drawer and close it",
        "put the {b} block into the {t} drawer and shut it",
        "place the {b} cube in the {t} drawer and close it",
        "drop the {b} block into the {t} drawer and shut it",
    ),
    "clear": (  # the tokenizer's words only: a new word would change the shipped checkpoints' vocabulary
        "put each block in its bowl",
        "put every block into its bowl",
        "put the blocks in the bowls of the same colour",
        "sort the blocks into the bowls",
    ),
}
PHRASINGS = ("canonical", "train", "heldout", "all")
COMBOS = ("all", "train", "heldout")
COLOUR_NAMES = ("red", "green", "blue", "yellow")  # the palette's names, in actors/tabletop.py COLORS order
TWO_COLOUR_KINDS = ("push", "place", "stack", "stow")  # these name an object and a target; the others one


def templates(kind: str, phrasing: str) -> tuple[str, ...]:
    """The templates of an instruction kind (a family, or "open"/"close" for drawers) that ``phrasing`` allows."""
    all_ = TEMPLATES[kind]
    return {"canonical": all_[:1], "train": all_[:-1], "heldout": all_[-1:], "all": all_}[phrasing]


def combinations(kind: str) -> list[tuple[str, ...]]:
    """Every combination of named colours an instruction kind can have (stacking names two different blocks)."""
    if kind in ("sort", "clear"):
        return [()]
    if kind in TWO_COLOUR_KINDS:
        return [(b, t) for b in COLOUR_NAMES for t in COLOUR_NAMES if not (kind == "stack" and b == t)]
    return [(c,) for c in COLOUR_NAMES]


def _heldout(kind: str) -> frozenset[tuple[str, ...]]:
    # A quarter of each kind's combinations (at least one), picked by a stable hash (crc32: the same on every
    # machine and Python version). Sorting names no colour: its one combination stays in training.
    combos = combinations(kind)
    if len(combos) < 2:
        return frozenset()
    ranked = sorted(combos, key=lambda c: zlib.crc32("|".join((kind, *c)).encode()))
    return frozenset(ranked[: max(1, len(combos) // 4)])


HELDOUT = {kind: _heldout(kind) for kind in TEMPLATES}


def combo_is_heldout(kind: str, *colours: str) -> bool:
    """Whether the combination (instruction kind, named colours in order) belongs to the held-out split."""
    return tuple(colours) in HELDOUT[kind]


def combo_allowed(combos: str, kind: str, *colours: str) -> bool:
    if combos == "all":
        return True
    return combo_is_heldout(kind, *colours) == (combos == "heldout")


def every_instruction() -> list[str]:
    """Every instruction the built-in tasks can give (every template, every combination): what a tokenizer made
    for them must cover."""
    out = set()
    for kind, kinds_templates in TEMPLATES.items():
        for template in kinds_templates:
            for combo in combinations("open" if kind == "close" else kind):
                out.add(template.format(**dict(zip("bt", combo))))
    return sorted(out)
