"""A script's options as one typed dataclass: the command line is built from its fields, and the
same dataclass is written to and read back from JSON with its keys and types checked.

Each field says once what the option is (type, default, help, choices); `build_parser` turns the
fields into argparse options named after them (`learning_rate` -> `--learning-rate`).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

Config = TypeVar("Config")


def option(default: Any = None, help: str = "", group: str = "options", **argparse_kwargs) -> Any:
    """A dataclass field that is also a command-line option (argparse keywords pass through)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default),
                                 metadata={"help": help, "group": group, "argparse": argparse_kwargs})
    return dataclasses.field(default=default, metadata={"help": help, "group": group, "argparse": argparse_kwargs})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(hint) -> tuple[type, bool]:
    """(the scalar or element type, whether it is a list) of a field's annotation."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, type(int | None)):
        hint = args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def build_parser(cls, description: str, epilog: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, epilog=epilog, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    groups: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        meta = field.metadata
        if "help" not in meta:
            continue
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        kwargs = dict(meta["argparse"])
        base, is_list = _base_type(hints[field.name])
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        if base is bool:
            kwargs.setdefault("action", "store_true")
        else:
            kwargs.setdefault("type", base)
            kwargs.setdefault("nargs", "+" if is_list else None)
        shown = "" if default in (None, False, "") or base is bool else f" (default: {default})"
        group.add_argument(flag_name(field.name), dest=field.name, default=default,
                           help=meta["help"] + shown, **kwargs)
    return parser


def parse_config(cls: type[Config], argv: list[str] | None, description: str, epilog: str = "",
                 renamed: dict[str, tuple[str, str]] | None = None) -> Config:
    """The options of `argv` (the command line's when None); an old name in `renamed` ({old flag: (new flag,
    why)}) is a UserError that names the new one."""
    import sys

    from qexpand.errors import fail_if_problems

    given = sys.argv[1:] if argv is None else argv
    fail_if_problems([f"{old} is now {new} in this script ({why})" for old, (new, why) in (renamed or {}).items()
                      if any(a == old or a.startswith(old + "=") for a in given)],
                     "Run the command again with the new names.")
    namespace = build_parser(cls, description, epilog).parse_args(argv)
    return cls(**vars(namespace))


def to_json(config) -> dict:
    return dataclasses.asdict(config)


def _type_ok(value, hint) -> bool:
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)  # checked field by field when it is read
    if value is None:
        return type(None) in typing.get_args(hint)
    base, is_list = _base_type(hint)
    if is_list:
        return isinstance(value, list) and all(_type_ok(v, base) for v in value)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, base)


def from_json(cls: type[Config], data) -> Config:
    """The dataclass from a JSON object; ValueError naming every missing, unknown or mistyped key."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, found {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    problems = [f"missing key '{n}'" for n in names if n not in data]
    problems += [f"unknown key '{k}'" for k in data if k not in hints]
    problems += [f"'{n}' should be {hints[n]}, found {data[n]!r}" for n in names
                 if n in data and not _type_ok(data[n], hints[n])]
    if problems:
        raise ValueError("; ".join(problems))
    return cls(**{n: from_json(hints[n], data[n]) if dataclasses.is_dataclass(hints[n]) else data[n]
                  for n in names})


def given_fields(config) -> dict[str, Any]:
    """The fields set to something other than 'not given' (None, 'auto' for choices, False for a flag)."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    # `is False`, not `== False`: a count of 0 was given.
    return {name: value for name, value in values.items()
            if value is not None and value != "auto" and value is not False}
