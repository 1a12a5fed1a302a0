"""How every ``fedcmd`` (sub-)app is made: one boolean convention, help text printed as written.

Booleans: every on/off option accepts ``--flag``, ``--no-flag`` and the seed's ``--flag 1`` / ``--flag 0``
(also ``true/false``, ``yes/no``, ``on/off``, and ``--flag=1``). Click knows only the first two, so the
group rewrites the seed's spellings into them before the command parses its arguments.

Help: rich markup is off (``rich_markup_mode=None``), so ``[run]``, ``[hp.<algo>]`` and ``[default: ...]``
in a help text reach the screen instead of being taken for markup and dropped.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup

TRUE_WORDS = frozenset({"1", "true", "yes", "on", "y", "t"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", "n", "f"})


def _flags(command: Any) -> dict[str, str | None]:
    """Every spelling of a boolean flag -> the spelling of the opposite value (None: the flag has no off)."""
    out: dict[str, str | None] = {}
    for param in command.params:
        # duck-typed: typer bundles its own copy of click, whose classes are not the installed click's
        if not (getattr(param, "is_flag", False) and getattr(param, "is_bool_flag", False)):
            continue
        on = param.opts[0]
        off = param.secondary_opts[0] if param.secondary_opts else None
        out.update(dict.fromkeys(param.opts, off))
        out.update(dict.fromkeys(param.secondary_opts, on))
    return out


def normalise_booleans(command: Any, args: list[str]) -> list[str]:
    """Rewrite ``--flag 1|0`` and ``--flag=1|0`` into ``--flag`` / ``--no-flag`` for ``command``'s flags.
    A flag with no off spelling given 0 is dropped (off is its default)."""
    flags = _flags(command)
    if not flags:
        return args
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            out.extend(args[i:])
            break
        name, eq, value = token.partition("=")
        if name in flags:
            opposite = flags[name]
            word = value.lower() if eq else (args[i + 1].lower() if i + 1 < len(args) else "")
            if word in TRUE_WORDS or word in FALSE_WORDS:
                # --x 1 is --x, --x 0 is --no-x; and --no-x 1 is --no-x, --no-x 0 is --x
                chosen = name if word in TRUE_WORDS else opposite
                if chosen is not None:
                    out.append(chosen)
                i += 1 if eq else 2
                continue
            if eq:
                raise typer.BadParameter(f"{value!r} is not a boolean: give 1/0, true/false, yes/no or on/off",
                                         param_hint=name)
        out.append(token)
        i += 1
    return out


class FedcmdGroup(TyperGroup):
    """A typer group that hands its commands their arguments with the seed's boolean spellings rewritten."""

    def resolve_command(self, ctx: typer.Context, args: list[str]) -> Any:
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and not hasattr(command, "commands"):  # a command, not a group
            rest = normalise_booleans(command, rest)
        return name, command, rest


def new_app(help_text: str, **kwargs: Any) -> typer.Typer:
    """A sub-app with the house settings (the main app passes its own extras, e.g. completion)."""
    settings: dict[str, Any] = {
        "help": help_text,
        "no_args_is_help": True,
        "add_completion": False,
        "pretty_exceptions_enable": False,
        "rich_markup_mode": None,
        "cls": FedcmdGroup,
    }
    settings.update(kwargs)
    return typer.Typer(**settings)
