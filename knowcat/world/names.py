"""Synthetic entity names: pronounceable, unique, typed by their form.

Each entity type has its own shape (persons have two names, countries end in
-ia / -land ..., labels are "... Records") so a model can learn what kind of
answer a relation expects, while the answer space stays large: hundreds of
distinct objects per relation, so a guess rarely hits.
"""

from __future__ import annotations

import numpy as np

_ONSETS = ["b", "br", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "th", "sh", "ch", "w"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou"]
_CODAS = ["", "", "", "", "n", "r", "l", "s", "m"]

_SHAPES = {
    # type: (syllables in the stem, format string over stems)
    "person": (2, "{A} {B}"),
    "city": (2, "{A}"),
    "country": (2, "{A}{suffix}"),
    "region": (2, "{A} {region}"),
    "landmark": (2, "{A} {landmark}"),
    "university": (2, "{uni}"),
    "band": (2, "{band}"),
    "genre": (2, "{A} {genre}"),
    "label": (2, "{A} Records"),
    "work": (2, "{work}"),
    "company": (2, "{A} {company}"),
    "product": (2, "{A} {product}"),
    "language": (2, "{A}{lang}"),
}
_COUNTRY_SUFFIX = ["ia", "land", "stan", "ova", "ania", "ador"]
_REGION = ["Province", "County", "District", "Prefecture", "Canton"]
_LANDMARK = ["Tower", "Bridge", "Castle", "Abbey", "Lighthouse", "Fort", "Palace"]
_UNI = ["University of {A}", "{A} Institute", "{A} College", "{A} Academy"]
_BAND = ["The {A}s", "{A} Collective", "{A} Quartet", "{A} Ensemble"]
_GENRE = ["jazz", "folk", "wave", "rock", "metal", "pop", "core", "blues", "soul"]
_WORK = ["The {A} of {B}", "{A} Rising", "Songs of {A}", "The Last {A}", "{A} and {B}"]
_COMPANY = ["Motors", "Industries", "Systems", "Works", "Group", "Labs"]
_PRODUCT = ["X{n}", "{n}0", "Mark {roman}", "Pro"]
_LANG = ["ish", "ese", "ic", "ian", "i"]
_ROMAN = ["II", "III", "IV", "V", "VI", "VII"]


def _stem(rng: np.random.Generator, syllables: int) -> str:
    parts = []
    for _ in range(syllables):
        parts.append(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS))
    return "".join(parts).capitalize()


def make_name(rng: np.random.Generator, kind: str) -> str:
    syl, fmt = _SHAPES[kind]
    a, b = _stem(rng, syl), _stem(rng, syl)
    sub = {
        "A": a,
        "B": b,
        "suffix": rng.choice(_COUNTRY_SUFFIX),
        "region": rng.choice(_REGION),
        "landmark": rng.choice(_LANDMARK),
        "uni": str(rng.choice(_UNI)).format(A=a),
        "band": str(rng.choice(_BAND)).format(A=a),
        "genre": rng.choice(_GENRE),
        "work": str(rng.choice(_WORK)).format(A=a, B=b),
        "company": rng.choice(_COMPANY),
        "product": str(rng.choice(_PRODUCT)).format(n=int(rng.integers(1, 10)), roman=rng.choice(_ROMAN)),
        "lang": rng.choice(_LANG),
    }
    if kind == "language":
        sub["A"] = a[: max(3, len(a) - 1)]
    return fmt.format(**sub)


class NamePool:
    """Draws names that are unique across the whole world (no entity is two things).

    Persons are named as people are: a given name and a family name, each from a
    finite pool (``given_names`` and ``family_names`` of them), so many people
    share a given or a family name while no two share both.
    """

    def __init__(self, seed: int, given_names: int = 200, family_names: int = 400):
        self.rng = np.random.default_rng(seed)
        self.used: set[str] = set()
        stems = set()
        while len(stems) < given_names + family_names:
            stems.add(_stem(self.rng, 2))
        stems = sorted(stems)
        order = self.rng.permutation(len(stems))
        self.given = [stems[i] for i in order[:given_names]]
        self.family = [stems[i] for i in order[given_names:]]

    def _make(self, kind: str) -> str:
        if kind == "person":
            return f"{self.given[int(self.rng.integers(len(self.given)))]} " \
                   f"{self.family[int(self.rng.integers(len(self.family)))]}"
        return make_name(self.rng, kind)

    def draw(self, kind: str, n: int) -> list[str]:
        out = []
        tries = 0
        while len(out) < n:
            name = self._make(kind)
            tries += 1
            if tries > 200 * (n + 10):
                raise RuntimeError(f"cannot draw {n} unique {kind} names")
            key = name.casefold()
            if key in self.used:
                continue
            self.used.add(key)
            out.append(name)
        return out
