"""Settings of ``python -m remedi.evaluate`` from YAML files and dotted flags: ``--config FILE``,
``--rome.clamp 2``, ``--memit.layers [0,1,2]``, ``--ft.lr 1e-3`` and ``--print_config``.

A config file holds the command's flat options under their names (``method: [none, rome]``,
``data: builtin``, ``stats_tokens: 300``) and one section per method whose fields are that
method's settings dataclass, as registered (:mod:`remedi.registry`; e.g.
:class:`~remedi.methods.memit.MemitHyperParams`,
:class:`~remedi.methods.finetune.FinetuneHyperParams`; for a trained REMEDI editor
:class:`~remedi.editors.apply.RemediSettings`), typed and checked by jsonargparse.
The flat options become ordinary flags, so ``remedi.evaluate``'s own parser checks them; the
flat method flags (``--clamp``, ``--layer``, ``--memit-layers``, ``--ft-lr``, …) stay as aliases
of section fields.

Precedence, lowest first: the dataclass defaults, the config file, the flat aliases (command
line or the file's top level), the dotted flags on the command line. A field left ``null``
(``rome.layer``, ``rome.clamp``, ``memit.layers``, ``ft.layer``) takes the model's default from
:func:`model_defaults`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonargparse
import yaml

from remedi import registry
from remedi.cli import UsageError, one_line
from remedi.evaluation.settings import BiosSettings, McRaeSettings, ProbeSettings
from remedi.models import LoadedModel

TASK_SECTIONS: dict[str, type] = {
    "probe": ProbeSettings,
    "mcrae": McRaeSettings,
    "biosbias": BiosSettings,
}
"""The settings of REMEDI's own evaluations (see :mod:`remedi.evaluation`)."""


def all_sections() -> dict[str, type]:
    """Config sections and the dataclass each one fills: every registered method's settings
    (``ft`` serves FT and FT-L; ``remedi`` how a trained REMEDI editor is applied), then the
    tasks' sections."""
    return {**registry.sections(), **TASK_SECTIONS}


ALIASES: dict[str, tuple[tuple[str, str], ...]] = {
    "layer": (("rome", "layer"), ("ft", "layer")),
    "n_context": (("rome", "n_context"), ("memit", "n_context")),
    "clamp": (("rome", "clamp"), ("memit", "clamp")),
    "kl_weight": (("rome", "kl_weight"), ("memit", "kl_weight")),
    "weight_decay": (("rome", "weight_decay"), ("memit", "weight_decay")),
    "steps": (("rome", "steps"), ("memit", "steps")),
    "memit_layers": (("memit", "layers"),),
    "memit_lambda": (("memit", "mom2_weight"),),
    "ft_lr": (("ft", "lr"),),
    "ft_steps": (("ft", "steps"),),
    "ft_eps": (("ft", "eps"),),
    "memit_batch": (("memit", "batch"),),
}
"""Flat flag (by its argparse dest) -> the section fields it sets."""
OWN_FLAGS = ("--config", "--print_config")
HIDDEN_DESTS = ("help", "config", "print_config", *ALIASES)
"""Dests left out of a printed config (the aliases show up in the sections instead)."""


@dataclass
class ParsedConfig:
    """What :func:`split` and :func:`load` found: the flags for the flat parser, the sections
    from the file and dotted flags, which fields the dotted flags pinned, and --print_config."""

    flat_argv: list[str]
    sections: dict[str, Any]
    pinned: set[tuple[str, str]] = field(default_factory=set)
    print_config: bool = False


def model_defaults(lm: LoadedModel) -> dict[str, dict[str, Any]]:
    """The per-model defaults of each method section's null fields (from the methods'
    :meth:`~remedi.registry.Method.resolve`)."""
    found: dict[str, dict[str, Any]] = {}
    for name, cls in registry.sections().items():
        blank = cls()
        filled = resolved(lm, name, blank)
        found[name] = {
            f.name: getattr(filled, f.name)
            for f in dataclasses.fields(blank)
            if getattr(blank, f.name) is None and getattr(filled, f.name) is not None
        }
    return found


def resolved(lm: LoadedModel, section: str, hparams: Any) -> Any:
    """``hparams`` (of ``section``) with each null field that has a per-model default set."""
    return registry.method_class(section)(settings=hparams).resolve(lm)


def section_parser(flat: argparse.ArgumentParser) -> jsonargparse.ArgumentParser:
    """A jsonargparse parser of ``--config`` files and dotted flags: a typed group per section,
    and the flat parser's options by dest (so a file may set them; their checks stay there)."""
    p = jsonargparse.ArgumentParser(prog=flat.prog, exit_on_error=False, default_env=False)
    p.add_argument("--config", action=jsonargparse.ActionConfigFile)
    for name, cls in all_sections().items():
        p.add_class_arguments(cls, name)
    for action in flat._actions:
        if action.dest in HIDDEN_DESTS or action.dest in all_sections():
            continue
        p.add_argument(f"--{action.dest}", type=_loose_type(action), default=None)
    return p


def _loose_type(action: argparse.Action) -> Any:
    """The type a config file may give for a flat option (checked again by the flat parser)."""
    item: Any = action.type if action.type in (int, float) else str
    if action.nargs == 0:
        return bool | None
    if isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*"):
        return list[item] | None
    return item | None


def split(argv: Sequence[str]) -> tuple[list[str], list[str], bool]:
    """``argv`` split into the tokens for :func:`section_parser` (``--config`` first, then the
    dotted flags) and the rest, and whether ``--print_config`` was given."""
    configs: list[str] = []
    dotted: list[str] = []
    rest: list[str] = []
    print_config = False
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name, eq, value = token.partition("=")
        section = name[2:].partition(".")[0] if name.startswith("--") and "." in name else ""
        if name == "--print_config":
            print_config = True
        elif name == "--config" or section in all_sections():
            if not eq:
                if i + 1 >= len(tokens):
                    raise UsageError(f"{name} needs a value")
                value = tokens[i + 1]
                i += 1
            (configs if name == "--config" else dotted).extend([name, value])
        else:
            rest.append(token)
        i += 1
    return configs + dotted, rest, print_config


def load(argv: Sequence[str], flat: argparse.ArgumentParser) -> ParsedConfig:
    """Parse ``--config`` files and dotted flags out of ``argv``; the file's flat options become
    flags placed before the command line's own (which win; a repeated flag such as ``--method``
    on the command line replaces the file's list)."""
    ours, rest, print_config = split(argv)
    parser = section_parser(flat)
    try:
        cfg = parser.parse_args(ours)
    except (argparse.ArgumentError, jsonargparse.ArgumentError, ValueError) as err:
        message = _one_line(err)
        files = [ours[i + 1] for i, flag in enumerate(ours[:-1]) if flag == "--config"]
        if files and re.search(r"is not accepted|does not accept option", message):
            message = f"--config {files[-1]}: {message}"  # a key of the file: name the file
        raise UsageError(message) from err
    pinned = {
        (name[2:].partition(".")[0], name[2:].partition(".")[2].partition(".")[0])
        for name in ours[::2]
        if name != "--config"
    }
    try:
        found = {name: cls(**cfg[name].as_dict()) for name, cls in all_sections().items()}
    except ValueError as err:
        raise UsageError(one_line(err)) from err
    given = {token.partition("=")[0] for token in rest if token.startswith("--")}
    from_file: list[str] = []
    for action in flat._actions:
        value = cfg.get(action.dest) if action.dest not in HIDDEN_DESTS else None
        if value is None or (set(action.option_strings) & given and _repeats(action)):
            continue
        from_file += _tokens(action, value)
    return ParsedConfig(from_file + rest, found, pinned, print_config)


def _one_line(err: BaseException) -> str:
    """jsonargparse's (often multi-line) message in one line, naming keys as flags."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return re.sub(r'Parser key "([\w.]+)":', r"--\1:", text) or one_line(err)


def _repeats(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction)


def _tokens(action: argparse.Action, value: Any) -> list[str]:
    """The flags that give ``action`` the config file's ``value``."""
    flag = action.option_strings[0]
    if action.nargs == 0:
        return [flag] if value else []
    if _repeats(action):
        return [x for v in value for x in (flag, str(v))]
    if isinstance(value, list):
        return [flag, *map(str, value)]
    return [flag, str(value)]


def settings(
    args: argparse.Namespace,
    sections: dict[str, Any] | None = None,
    pinned: set[tuple[str, str]] | frozenset[tuple[str, str]] = frozenset(),
) -> dict[str, Any]:
    """Each section's dataclass: ``sections`` (defaults when None) with the flat aliases given
    in ``args`` applied, except to the fields ``pinned`` by dotted flags."""
    result = {
        name: dataclasses.replace(sections[name]) if sections else cls()
        for name, cls in all_sections().items()
    }
    for dest, targets in ALIASES.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        for section, name in targets:
            if (section, name) not in pinned:
                setattr(result[section], name, tuple(value) if isinstance(value, list) else value)
    return result


def dump(args: argparse.Namespace, sections: dict[str, Any]) -> str:
    """The whole configuration as YAML that ``--config`` reads back (flat options by dest, then
    the sections; the flat aliases are folded into the sections)."""
    flat = {
        key: str(value) if isinstance(value, Path) else value
        for key, value in vars(args).items()
        if key not in HIDDEN_DESTS and key not in (*all_sections(), "checkpoints", "settings")
    }
    for name, hparams in sections.items():
        flat[name] = {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(hparams).items()
        }
    return yaml.safe_dump(flat, sort_keys=False)


def sections_help() -> str:
    """The epilog paragraph that lists the sections' fields and their defaults."""
    lines = [
        "config files and per-method settings (see remedi.evaluation.config):",
        "  --config FILE       a YAML file of the flat options by name (method: [none, rome],",
        "                      data: builtin, ...) and the sections below; command-line flags win",
        "  --print_config      print the complete configuration as YAML and exit",
    ]
    for name, cls in all_sections().items():
        fields = ", ".join(
            f"{f.name}={f.default!r}".replace("'", "") for f in dataclasses.fields(cls)
        )
        text = f"{cls.__name__}: {fields}"
        lines += textwrap.wrap(
            text,
            98,
            initial_indent=f"  --{name}.FIELD VALUE ".ljust(22),
            subsequent_indent=" " * 22,
        )
    lines.append(
        "  null layers and clamps take the model's default (evaluate_config.model_defaults)"
    )
    return "\n".join(lines) + "\n"


def print_config(args: argparse.Namespace, sections: dict[str, Any]) -> None:
    """Write :func:`dump` to stdout."""
    sys.stdout.write(dump(args, sections))
