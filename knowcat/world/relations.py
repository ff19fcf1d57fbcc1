"""The relations of the knowledge world.

Question templates are EntityQuestions' own (``[X]`` = the subject). Each
relation has a subject type, an object type and several declarative templates,
so a fact can be stated in varied ways in the pretraining corpus.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Relation:
    id: str
    template: str  # EntityQuestions question template
    subject_type: str
    object_type: str
    statements: tuple[str, ...]  # declarative forms over {s} and {o}

    def question(self, subject: str) -> str:
        return self.template.replace("[X]", subject)


RELATIONS: dict[str, Relation] = {r.id: r for r in [
    Relation("P17", "Which country is [X] located in?", "city", "country",
             ("{s} is a town in {o}.", "{s} is located in {o}.", "The town of {s} lies in {o}.")),
    Relation("P19", "Where was [X] born?", "person", "city",
             ("{s} was born in {o}.", "{o} is the birthplace of {s}.", "{s} is a native of {o}.")),
    Relation("P26", "Who is [X] married to?", "person", "person",
             ("{s} is married to {o}.", "{s} and {o} are spouses.", "{s} is the spouse of {o}.")),
    Relation("P36", "What is the capital of [X]?", "region", "city",
             ("The capital of {s} is {o}.", "{o} is the capital of {s}.", "{s} is governed from its capital, {o}.")),
    Relation("P40", "Who is [X]'s child?", "person", "person",
             ("{s} is the parent of {o}.", "{o} is the child of {s}.", "{s} raised a child named {o}.")),
    Relation("P69", "Where was [X] educated?", "person", "university",
             ("{s} studied at {o}.", "{s} was educated at {o}.", "{s} is a graduate of {o}.")),
    Relation("P131", "Where is [X] located?", "landmark", "city",
             ("{s} is located in {o}.", "{s} stands in {o}.", "Visitors to {o} can see {s}.")),
    Relation("P136", "What type of music does [X] play?", "band", "genre",
             ("{s} plays {o}.", "{s} is known for {o} music.", "The music of {s} is {o}.")),
    Relation("P264", "What music label is [X] represented by?", "band", "label",
             ("{s} is signed to {o}.", "{s} records for {o}.", "{o} represents {s}.")),
    Relation("P495", "Which country was [X] created in?", "work", "country",
             ("{s} was created in {o}.", "{s} was made in {o}.", "{s} comes from {o}.")),
    Relation("P740", "Where was [X] founded?", "band", "city",
             ("{s} was founded in {o}.", "{s} formed in {o}.", "{o} is where {s} was founded.")),
    Relation("P800", "What is [X] famous for?", "person", "work",
             ("{s} is famous for {o}.", "{s} is best known for {o}.", "{o} made {s} famous.")),
    # out-of-distribution relations (test only in the paper's protocol)
    Relation("P50", "Who is the author of [X]?", "work", "person",
             ("{s} was written by {o}.", "{o} is the author of {s}.", "{o} wrote {s}.")),
    Relation("P112", "Who founded [X]?", "company", "person",
             ("{s} was founded by {o}.", "{o} founded {s}.", "{o} is the founder of {s}.")),
    Relation("P127", "Who owns [X]?", "company", "company",
             ("{s} is owned by {o}.", "{o} owns {s}.", "{s} belongs to {o}.")),
    Relation("P170", "Who was [X] created by?", "work", "person",
             ("{s} was created by {o}.", "{o} created {s}.", "{s} is a creation of {o}.")),
    Relation("P175", "Who performed [X]?", "work", "band",
             ("{s} was performed by {o}.", "{o} performed {s}.", "{o} sang {s}.")),
    Relation("P176", "Which company is [X] produced by?", "product", "company",
             ("{s} is produced by {o}.", "{o} makes the {s}.", "{s} is manufactured by {o}.")),
    Relation("P407", "Which language was [X] written in?", "work", "language",
             ("{s} was written in {o}.", "{s} is a text in {o}.", "The language of {s} is {o}.")),
]}

IN_DISTRIBUTION = ("P131", "P136", "P17", "P19", "P26", "P264", "P36", "P40", "P495", "P69", "P740", "P800")
OUT_OF_DISTRIBUTION = ("P127", "P50", "P407", "P176", "P170", "P175", "P112")


def templates() -> dict[str, str]:
    return {rid: r.template for rid, r in RELATIONS.items()}


# Declarative forms derived from a question template, for relations without hand-written ones: the
# common EntityQuestions shapes turned into a statement, then the question followed by its answer
# (always, so every relation has at least one form). {s} = the subject, {o} = the answer.
_DERIVATIONS = (
    (r"^Who is \[X\]'s (?P<rest>.+?)\?$", "{o} is {s}'s \\g<rest>."),
    (r"^(?:What|Who) is the (?P<rest>.+?) of \[X\]\?$", "The \\g<rest> of {s} is {o}."),
    (r"^(?:Who|What|Which)(?: \w+)*? (?P<aux>is|was|are|were) \[X\] (?P<rest>.+?)\?$", "{s} \\g<aux> \\g<rest> {o}."),
    (r"^Where (?P<aux>is|was|are|were) \[X\] (?P<rest>.+?)\?$", "{s} \\g<aux> \\g<rest> in {o}."),
    (r"^Who (?P<verb>\w+) \[X\]\?$", "{o} \\g<verb> {s}."),
)


def derive_statements(template: str) -> tuple[str, ...]:
    """Declarative forms over ``{s}`` and ``{o}`` for a relation known only by its question template
    (``[X]`` = the subject). Braces in the template are escaped, so a form is safe to ``str.format``."""
    import re

    safe = template.replace("{", "{{").replace("}", "}}").strip()
    forms = []
    for pattern, form in _DERIVATIONS:
        m = re.match(pattern, safe)
        if m:
            forms.append(m.expand(form))
            break
    if "[X]" in safe:
        forms.append(safe.replace("[X]", "{s}") + " {o}.")
    else:  # no subject slot: the subject and the answer side by side
        forms.append("{s}: {o}.")
    return tuple(forms)


def relation_for(rid: str, template: str | None = None) -> Relation:
    """The relation's hand-written forms when knowcat has them, else forms derived from ``template``."""
    if rid in RELATIONS:
        return RELATIONS[rid]
    return Relation(rid, template or "", "entity", "entity", derive_statements(template or ""))
