"""The ``EditCase`` schema shared by every method, and its validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Benchmark = Literal["counterfact", "zsre"]
"""Which metrics score a case: CounterFact's probability comparisons, or zsRE's token accuracy
(see :mod:`remedi.metrics`). The readers set it from the data's layout."""
BENCHMARKS: tuple[Benchmark, ...] = ("counterfact", "zsre")


class CaseError(ValueError):
    """A record that cannot become an :class:`EditCase`; names the case and the field."""

    def __init__(self, case_id: object, field_name: str, message: str) -> None:
        super().__init__(f"case {case_id}: {field_name}: {message}")
        self.case_id = case_id
        self.field = field_name
        self.message = message


@dataclass
class EditCase:
    """One counterfactual edit request with the prompts that score it (CounterFact layout).

    ``prompt`` is a template with one ``{}`` where the subject goes. ``target_new`` is ``None``
    for records that only state a fact (ROME's known facts). Neighborhood prompts are about
    other subjects whose true object is ``target_true``, unless ``neighborhood_targets`` gives
    each one its own answer (zsRE-style locality questions). ``benchmark`` names the metrics
    that score the case: ``zsre`` cases are questions whose neighborhood prompts are unrelated
    Natural Questions with their own answers.
    """

    case_id: int | str
    subject: str
    prompt: str
    target_true: str
    target_new: str | None
    relation_id: str = ""
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    attribute_prompts: list[str] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    neighborhood_targets: list[str] | None = None
    benchmark: Benchmark = "counterfact"

    @property
    def rewrite_prompt(self) -> str:
        """The template with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    @property
    def edit_statement(self) -> str:
        """The sentence that states the requested fact: ``rewrite_prompt + " " + target_new``
        (REMEDI's context, the ``prefix`` baseline's prefix, KE's request text); the only place
        it is built. Empty for a case that requests no edit."""
        if self.target_new is None:
            return ""
        return f"{self.rewrite_prompt} {self.target_new.strip()}"

    @property
    def subject_start(self) -> int:
        """Character offset of the subject in :attr:`rewrite_prompt`: where the template's
        ``{}`` is (not the subject's first occurrence, which may be earlier)."""
        return self.prompt.index("{}")

    def validate(self) -> EditCase:
        """Raise :class:`CaseError` naming the first bad field; return ``self`` when sound.

        ``target_new`` may equal ``target_true`` only in zsRE cases: zsRE scores the target's
        token accuracy alone, and some of its edits ask for the true answer the LM gets wrong.
        """
        cid = self.case_id
        if not self.subject.strip():
            raise CaseError(cid, "subject", "is empty")
        if self.prompt.count("{}") != 1:
            raise CaseError(
                cid, "prompt", f"must contain exactly one '{{}}' for the subject: {self.prompt!r}"
            )
        if not self.target_true.strip():
            raise CaseError(cid, "target_true", "is empty")
        if self.target_new is not None:
            if not self.target_new.strip():
                raise CaseError(cid, "target_new", "is empty")
            same = self.target_new.strip() == self.target_true.strip()
            if same and self.benchmark != "zsre":
                raise CaseError(cid, "target_new", f"equals target_true ({self.target_true!r})")
        for i, text in enumerate(self.paraphrase_prompts):
            if self.subject not in text:
                raise CaseError(
                    cid, f"paraphrase_prompts[{i}]", f"does not mention subject {self.subject!r}"
                )
        if self.benchmark not in BENCHMARKS:
            raise CaseError(cid, "benchmark", f"must be one of {', '.join(BENCHMARKS)}")
        if self.neighborhood_targets is not None and len(self.neighborhood_targets) != len(
            self.neighborhood_prompts
        ):
            raise CaseError(
                cid,
                "neighborhood_targets",
                f"has {len(self.neighborhood_targets)} entries for "
                f"{len(self.neighborhood_prompts)} neighborhood prompts",
            )
        return self


@dataclass(frozen=True)
class RemediExample:
    """One training example: edit ``entity`` in ``prompt`` with the attribute ``context`` states.

    ``context`` mentions the entity; the attribute is the context text after it.
    ``target_unmediated`` is the entity's own (prior) answer, when there is one.
    """

    entity: str
    context: str
    prompt: str
    target_mediated: str
    target_unmediated: str | None = None
    case_id: int | str = -1
