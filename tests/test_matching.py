"""``may_still_match``: the test lazy SliCK abandons a sample on must never abandon one that would
have been correct; and it must abandon the plainly hopeless ones (else it saves nothing)."""

import random

import pytest

from knowcat.matching import is_correct, may_still_match


@pytest.mark.parametrize("partial, answers, expected", [
    ("", ["Paris"], True),
    ("Par", ["Paris"], True),
    ("Lon", ["Paris"], False),
    ("Paris ", ["Paris"], True),  # white space, punctuation or articles may still follow
    ("Paris Hil", ["Paris"], False),
    ("New Yo", ["New York City"], True),
    ("New Yok", ["New York City"], False),
    ("The ", ["New York"], True),  # an article, dropped by normalization
    ("th", ["New York"], True),  # may become "the"
    ("thx", ["New York"], False),
    ("an", ["Oslo"], True),
    ("Saint-Ét", ["saint étienne", "St Etienne"], False),  # the hyphen is dropped: "saintét..." is one word
    ("Saint Ét", ["saint étienne"], True),
    ("Lon", ["Paris", "London"], True),  # any alias
    ("U.S", ["US"], True),
    ("a–", ["b"], True),  # a character that splits words by itself: nothing decided
    ("ΑΣ", ["Ασια"], True),  # "ΑΣ".lower() ends in a final sigma; "ΑΣΙΑ".lower() has an ordinary one
    ("ΟΔΥΣ", ["Οδυσσεας"], True),
    ("ΑΣΤ", ["Ασια"], False),
])
def test_exact_prefixes(partial, answers, expected):
    assert may_still_match(partial, answers) is expected


@pytest.mark.parametrize("mode", ["contains", "f1", "f1@0.8", "judge"])
def test_other_modes_never_abandon(mode):
    assert may_still_match("completely wrong", ["Paris"], mode)


def test_never_abandons_an_answer_that_would_be_correct():
    """Every prefix of every random answer: a False is only ever given to an answer judged wrong."""
    rng = random.Random(7)
    alphabet = list("abtheno ") + ["-", ".", "'", "–", "é", "1", "A", "T", "\t", "Σ", "σ", "ς", "ι", "İ"]
    words = ["a", "an", "the", "then", "there", "ant", "new", "york", "the-end", "a–b", "théo", "1a",
             "ασια", "σις"]
    abandoned = correct = 0
    for _ in range(20000):
        gold = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        if rng.random() < 0.5:  # near the answer
            text = gold
            for _ in range(rng.randint(0, 3)):
                i = rng.randint(0, len(text))
                text = text[:i] + rng.choice(alphabet) + text[i:]
        else:
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        ok = is_correct(text, [gold])
        correct += ok
        for k in range(len(text) + 1):
            if not may_still_match(text[:k], [gold]):
                abandoned += 1
                assert not ok, (text, text[:k], gold)
    assert correct > 1000 and abandoned > 10000, (correct, abandoned)
