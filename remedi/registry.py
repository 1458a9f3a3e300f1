"""The registry of editing methods: every method, learned or not, is one :class:`Method`
subclass registered once, in its own module under :mod:`remedi.methods`.

    @register
    class Rome(Method):
        name = "rome"
        Settings = RomeHyperParams
        @contextmanager
        def edit(self, lm, requests): ...

A method carries its name, a one-line summary (for ``--help``), its typed settings (a
dataclass with defaults), whether it is trained (then the LightningModule that trains it, named
by import path so that this library never imports Lightning, and how a checkpoint of it is
loaded) and one way to apply it: the context manager :meth:`Method.edit`, which edits the model
for some requests (weights, hooks, a prefix: whatever the method is) and yields an
:class:`Edited` model; on exit, exceptions included, the model is bitwise as it was.

``remedi.evaluate``, ``remedi.edit``, the Python API and ``--help`` list methods from here; no
command names a method. Modules under :mod:`remedi.methods` are imported on first use of the
registry, so a new method is one new module there (plus its config).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from remedi.data import EditCase
    from remedi.methods.requests import EditRequest
    from remedi.metrics.generation import GenerationEdit
    from remedi.metrics.rows import EditContext
    from remedi.models import LoadedModel

_METHODS: dict[str, type[Method]] = {}
_DISCOVERED = False
METHOD_PACKAGES = ("remedi.methods",)
"""Packages whose modules are imported to register the built-in methods."""


@dataclass
class NoSettings:
    """The settings of a method that has none."""


@dataclass
class Statistics:
    """Where ROME-like methods take their second-moment statistics from (``--corpus``,
    ``--stats-tokens``, ``--no-stats``), and an in-memory cache of what was collected."""

    corpus: str | None = None
    n_tokens: int = 100_000
    enabled: bool = True
    announce: Callable[[str], None] | None = None
    cache: dict[int, Any] = field(default_factory=dict, repr=False)
    """Statistics already collected, by layer (filled as layers are asked for)."""

    def of(self, lm: LoadedModel, layers: Sequence[int]) -> dict[int, Any] | None:
        """The second moment of each of ``layers`` (None when disabled: identity)."""
        if not self.enabled:
            return None
        from remedi.methods import second_moment

        wanted = [layer for layer in layers if layer not in self.cache]
        if wanted:
            collected = second_moment.collect(lm, wanted, self.corpus, n_tokens=self.n_tokens)
            if self.announce is not None:
                self.announce(second_moment.source_line(collected, self.corpus))
            self.cache.update(collected)
        return {layer: self.cache[layer] for layer in layers}


@dataclass
class Environment:
    """What an evaluation lends every method: the statistics source, the pool of cases a
    method may draw partners from (``replace``), a seed, and the scoring batch size."""

    statistics: Statistics = field(default_factory=Statistics)
    pool: Sequence[EditCase] = ()
    heldout: list[list[int]] | None = None
    """Token windows of the held-out text (:mod:`remedi.metrics.perplexity`); None: its
    perplexity is not measured."""
    heldout_perplexity: float = 1.0
    """The unedited model's perplexity on :attr:`heldout`."""
    unrelated_tokens: int = 0
    """Tokens sampled after unrelated prompts under each edit for ``unrelated_entropy`` (0:
    not measured)."""
    references: Sequence[Any] | None = None
    """Per evaluated case, the unedited next-token distributions of its CounterFact+ prompts
    (:func:`remedi.metrics.specificity.references`); None: CounterFact+ is not scored."""
    seed: int = 0
    batch_size: int = 32
    progress: bool = True


class Edited:
    """A model under an edit: what :meth:`Method.edit` yields.

    It behaves like the :class:`~remedi.models.LoadedModel` it wraps (``model``, ``tokenizer``,
    ``arch``, ``device`` ...), whose weights a weight editor has changed, and adds what an
    input-side edit needs: :meth:`scored_case` (the case as the method scores it, e.g. with a
    prefix or another subject; None: the method cannot score it), :attr:`row_edit` (hooks run
    around each batch of scored rows, ``row.case_index`` being the request's index), and
    :meth:`generation` (the text put before a prompt and the hook applied while generating).
    """

    def __init__(
        self,
        lm: LoadedModel,
        cases: Sequence[EditCase],
        row_edit: EditContext | None = None,
    ) -> None:
        self.lm = lm
        self.cases = list(cases)
        self.row_edit = row_edit

    def __getattr__(self, name: str) -> Any:
        if name == "lm":
            raise AttributeError(name)
        return getattr(self.lm, name)

    def scored_case(self, index: int, case: EditCase) -> EditCase | None:
        """``case`` (request ``index`` of this edit) as this method scores it."""
        return case

    def text_prefix(self) -> str:
        """Text the edit puts before any input (a prefix method's statements); empty for
        edits that live in the weights or in hooks."""
        return ""

    def sampled_case(self, index: int, case: EditCase) -> EditCase:
        """The case whose generation prompts are sampled for request ``index``."""
        return case

    def generation(self, index: int) -> tuple[str, GenerationEdit | None]:
        """The text put before request ``index``'s generation prompts and the hook applied
        while generating from them."""
        return "", None

    def generate(self, prompt: str, max_new_tokens: int = 20, **kwargs: Any) -> str:
        """Greedy continuation of free text ``prompt`` by the edited model."""
        from remedi.tokens import generate_text

        return generate_text(self.lm, prompt, max_new_tokens, **kwargs)


class Method(ABC):
    """One editing method; see the module docstring. Instances hold resolved settings (and, for a
    trained method, the loaded editor); :meth:`edit` applies them."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Settings: ClassVar[type] = NoSettings
    section: ClassVar[str | None] = None
    """The evaluate config section holding the settings (default: the name)."""
    trained: ClassVar[bool] = False
    lightning_module: ClassVar[str | None] = None
    """``package.module:Class`` of the LightningModule that trains it (trained methods)."""
    edits_input: ClassVar[bool] = False
    """True when the edit lives in the input (a prefix, another subject, a hook keyed on the
    subject's mention) rather than in the weights."""
    edits_neighbors: ClassVar[bool] = True
    """False when the edit cannot reach the plain neighbourhood prompts by construction (it keys
    on the subject's mention or swaps the subject): their score is then the unedited model's and
    is reported as n/a, the CounterFact+ neighbourhood standing in for it."""
    uses_statistics: ClassVar[bool] = False
    """True when the method reads second-moment statistics (the protocol names the source)."""
    requires_statistics: ClassVar[bool] = False
    """True when the method cannot run on identity statistics (``--no-stats`` is refused)."""
    random: ClassVar[bool] = False
    """True when the edit draws at random from ``environment.seed`` (``--seeds`` reruns it)."""
    writes_weights: ClassVar[bool] = False
    """True when the edit lives in the weights (``remedi.edit`` can save the edited model)."""
    keeps_memory: ClassVar[bool] = False
    """True when edits accumulate in a memory the method keeps (SERAC), not in the weights:
    under an accumulating schedule :meth:`remember` adds each group and :meth:`stream_edit`
    routes the scored rows against everything remembered."""
    scores_free_text: ClassVar[bool] = True
    """False when free text (the held-out perplexity text, unrelated prompts' samples) does not
    pass through the edit as scored prompts do (SERAC routes scored prompts only): its
    ``perplexity_ratio`` and ``unrelated_entropy`` are then n/a, not the unedited model's."""
    timed: ClassVar[bool] = True
    """False for methods that make no edit to time (none, prefix, replace)."""
    order: ClassVar[int] = 100
    """Where the method appears in lists (lowest first; ties in registration order)."""
    group_size: ClassVar[int | None] = 1
    """Cases edited at once when each case is scored on its own edit: 1, or None for all of
    them (the edit treats each request separately, so grouping changes no score)."""

    def __init__(self, settings: Any = None, checkpoint: str | Path | None = None, **kw: Any):
        if settings is not None and kw:
            raise TypeError("give settings or keyword settings, not both")
        self.settings = settings if settings is not None else make_settings(self, kw)
        self.environment = Environment()
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.loaded: Any = None
        if not self.trained and self.checkpoint is not None:
            raise ValueError(f"{self.name} is not trained: it takes no checkpoint")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings!r})"

    def resolve(self, lm: LoadedModel) -> Any:
        """The settings with the model's defaults in place of null fields."""
        return self.settings

    def group(self, n_cases: int) -> int:
        """How many cases one edit takes when each case is scored on its own edit."""
        return n_cases if self.group_size is None else self.group_size

    def bind(self, lm: LoadedModel, dtype: str = "float32") -> None:
        """Load what the method needs for ``lm`` (a trained editor's checkpoint) once."""
        if self.trained and self.loaded is None:
            if self.checkpoint is None:
                raise ValueError(f"{self.name} is a trained editor: give checkpoint=PATH")
            self.loaded = self.load(self.checkpoint, lm, dtype)

    def load(self, checkpoint: Path, lm: LoadedModel, dtype: str) -> Any:
        """A trained method's editor from ``checkpoint`` for ``lm``."""
        raise NotImplementedError(f"{self.name} is not a trained editor")

    def begin_stream(self, lm: LoadedModel) -> None:
        """Edits from now on accumulate in ``lm`` until :meth:`end_stream` (a sequential or
        batched schedule, :mod:`remedi.evaluation.stream`); methods with state that grows
        along a stream (AlphaEdit's earlier keys, a memory) start it here."""
        return None

    def end_stream(self, lm: LoadedModel) -> None:
        """The stream is over (the model is restored): drop what :meth:`begin_stream` began."""
        return None

    def remember(self, lm: LoadedModel, cases: Sequence[EditCase]) -> None:
        """Add ``cases`` to the stream's memory (methods that :attr:`keeps_memory`)."""
        raise NotImplementedError(f"{self.name} keeps no memory of edits")

    def stream_edit(self, lm: LoadedModel) -> EditContext | None:
        """The edit context the stream's scored rows run under (methods that
        :attr:`keeps_memory`); None: the model as it is."""
        return None

    @classmethod
    def check_requests(cls, requests: Sequence[EditRequest | EditCase]) -> str | None:
        """Why the method cannot edit ``requests`` (one line), found before the model loads;
        None when it can."""
        return None

    @abstractmethod
    def edit(
        self, lm: LoadedModel, requests: Sequence[EditRequest | EditCase]
    ) -> AbstractContextManager[Edited]:
        """Edit ``lm`` for ``requests``; the context yields the edited model and restores
        ``lm`` bitwise on exit, also on an exception."""


def make_settings(method: Method | type[Method], given: dict[str, Any]) -> Any:
    """The method's settings dataclass with ``given`` fields set; an unknown field raises a
    one-line ``ValueError`` naming it and the valid ones."""
    cls = method.Settings
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in given if key not in names]
    if unknown:
        valid = ", ".join(names) if names else "none"
        raise ValueError(
            f"{method.name}: unknown setting {unknown[0]!r}; its settings are: {valid}"
        )
    return cls(**given)


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` reachable by its ``name`` (a later one replaces it)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _METHODS[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a method (tests that register a toy one)."""
    _METHODS.pop(name, None)


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for package_name in METHOD_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package_name}.{info.name}")


def names() -> list[str]:
    """Every registered method's name, in registration order."""
    _discover()
    return sorted(_METHODS, key=lambda name: _METHODS[name].order)


def trained_names() -> list[str]:
    """The registered methods that are trained (take a checkpoint)."""
    return [name for name in names() if _METHODS[name].trained]


def method_class(name: str) -> type[Method]:
    """The registered method ``name``; a one-line ``ValueError`` listing them otherwise."""
    _discover()
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; registered methods: {', '.join(names())}"
        ) from None


def editor(name: str, checkpoint: str | Path | None = None, **settings: Any) -> Method:
    """A registered method with its default settings, ``settings`` overriding them (a trained
    one from ``checkpoint``)."""
    return method_class(name)(checkpoint=checkpoint, **settings)


def as_method(item: str | Method) -> Method:
    """A method instance from a name (default settings) or an instance."""
    return item if isinstance(item, Method) else editor(item)


def sections() -> dict[str, type]:
    """Config section -> settings dataclass of every method that has settings."""
    found: dict[str, type] = {}
    for name in names():
        cls = _METHODS[name]
        if cls.Settings is not NoSettings:
            found.setdefault(cls.section or cls.name, cls.Settings)
    return found


def help_lines() -> list[str]:
    """``  NAME  summary`` for every method (``--help``)."""
    width = max(len(n) for n in names()) + 2
    return [f"  {n.ljust(width)}{_METHODS[n].summary}" for n in names()]


def as_cases(requests: Sequence[EditRequest | EditCase]) -> list[EditCase]:
    """Requests as :class:`~remedi.data.EditCase` objects (cases pass through)."""
    from remedi.data import EditCase

    cases = []
    for i, item in enumerate(requests):
        if isinstance(item, EditCase):
            cases.append(item)
        else:
            cases.append(
                EditCase(
                    case_id=i,
                    subject=item.subject,
                    prompt=item.prompt,
                    target_true=item.target_true or "",
                    target_new=item.target_new,
                )
            )
    return cases


@contextmanager
def weight_edit(
    lm: LoadedModel, cases: Sequence[EditCase], handles: Callable[[], Sequence[Any]]
) -> Iterator[Edited]:
    """The context of a method that writes weights: ``handles()`` applies the edits and returns
    their :class:`~remedi.methods.weights.EditHandle`\\ s (each restoring itself on error);
    all are restored on exit, the latest first."""
    made: list[Any] = []
    try:
        made.extend(handles())
        yield Edited(lm, cases)
    finally:
        for handle in reversed(made):
            handle.restore()


def sequential_handles(
    cases: Sequence[EditCase], apply_one: Callable[[EditCase], Any]
) -> Callable[[], list[Any]]:
    """A ``handles`` function for :func:`weight_edit` that applies ``apply_one`` to each case
    in turn, restoring the earlier ones if a later one fails."""

    def apply() -> list[Any]:
        done: list[Any] = []
        try:
            for case in cases:
                done.append(apply_one(case))
        except BaseException:
            for handle in reversed(done):
                handle.restore()
            raise
        return done

    return apply


def no_edit(lm: LoadedModel, cases: Sequence[EditCase]) -> AbstractContextManager[Edited]:
    """The context of a method that leaves the model as it is."""
    return nullcontext(Edited(lm, cases))


class WeightMethod(Method):
    """Base of the methods whose edit is written into the weights: :meth:`write` applies the
    requests and returns the handles that restore them; :meth:`edit` restores on exit, and
    ``remedi.edit`` keeps what :meth:`write` wrote."""

    writes_weights = True

    @abstractmethod
    def write(self, lm: LoadedModel, cases: Sequence[EditCase]) -> list[Any]:
        """Write ``cases`` into ``lm``'s weights; the :class:`~remedi.methods.weights.EditHandle`
        objects that restore them (the model is unchanged if this raises)."""

    def edit(
        self, lm: LoadedModel, requests: Sequence[EditRequest | EditCase]
    ) -> AbstractContextManager[Edited]:
        cases = as_cases(requests)
        return weight_edit(lm, cases, lambda: self.write(lm, cases))


class TrainedMethod(Method):
    """Base of the learned editors: :meth:`load` reads and checks the checkpoint (one place:
    :mod:`remedi.checkpoints`) and puts its weights into the network :meth:`build` makes."""

    trained = True

    def load(self, checkpoint: Path, lm: LoadedModel, dtype: str) -> Any:
        import logging

        from remedi import checkpoints

        found = checkpoints.load_trained(checkpoint, self.name, lm.spec, lm.arch.hidden_size)
        for layer in found.layers:
            lm.arch.check_layer(layer)
        self.layers = found.layers
        network = self.build(lm, found)
        try:
            network.load_state_dict(found.state)
        except RuntimeError as err:
            raise checkpoints.CheckpointError(
                f"checkpoint {checkpoint}: its {self.name} weights do not fit "
                f"({checkpoints._first_line(err)})"
            ) from err
        if not found.best:
            logging.getLogger(__name__).warning(
                "%s: %s holds no best-validation weights; using its last weights",
                self.name,
                checkpoint,
            )
        return network.to(lm.device).eval()

    @abstractmethod
    def build(self, lm: LoadedModel, found: Any) -> Any:
        """The untrained network the checkpoint ``found`` (a
        :class:`~remedi.checkpoints.TrainedCheckpoint`) was trained as."""
