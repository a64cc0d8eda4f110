"""One line for a config error: the bad key, where it is, and the closest valid keys.

jsonargparse reports a bad value inside a `class_path` / `init_args` tree as a nested text: a
"Parser key" line per level, and for every Union (a model is `AdapterModule | None`) one error
per alternative. Most of those alternatives are noise (the value is not None; the `kind` tag is
not that alternative's). `one_line` walks the text, keeps the key path, drops the noise and
names what remains, with the closest valid option names for an unknown one.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass

_KEY = re.compile(r'^(?:- )?Parser key "([^"]+)":\s*(.*)$')
_CLASS = re.compile(r"^(?:- )?Problem with given class_path '([^']+)':\s*(.*)$")
_UNKNOWN_OPTION = re.compile(r"^Option '([^']+)' is not accepted$")
_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (.+)$")
_SUBCOMMAND_OPTION = re.compile(r"^Subcommand '[^']+' does not accept option '([^']+)'$")
_MISSING_FILE = re.compile(r"^File does not exist: '([^']+)'")
# Union alternatives that did not apply: the value is not None, or its `kind` is another one.
_NONE = re.compile(r"^(?:- )?Expected a <class 'NoneType'>")
_LITERAL = re.compile(r"^(?:- )?Expected a typing\.Literal\[(.*)\]\. Got value: (.*)$")
UNION_TEXT = "Does not validate against any of the Union subtypes"
_STRUCTURE = (
    UNION_TEXT,
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
)


@dataclass
class _Leaf:
    path: list[str]  # keys from the top, e.g. ["model", "init_args", "router_loss"]
    owner: str | None  # the class whose option is bad, if any
    message: str


def _leaves(text: str) -> list[_Leaf]:
    """Every message of the nested error text, with the key path and class it belongs to."""
    stack: list[tuple[int, str | None, str | None]] = []  # (indent, key, class path)
    leaves = []
    for raw in text.splitlines():
        if not raw.strip():
            continue
        indent = len(raw) - len(raw.lstrip())
        line = raw.strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key, owner, rest = None, None, line
        if match := _KEY.match(line):
            key, rest = match.group(1), match.group(2)
        elif match := _CLASS.match(line):
            owner, rest = match.group(1), match.group(2)
        if key is not None or owner is not None:
            stack.append((indent, key, owner))
        rest = rest.removeprefix("- ").strip()
        if not rest or rest.startswith(_STRUCTURE) or _NONE.match(rest):
            continue
        owners = [o for _, _, o in stack if o]
        leaves.append(_Leaf(_with_init_args(stack), owners[-1] if owners else None, rest))
    return leaves


def _not_one_of(leaves: list[_Leaf]) -> str | None:
    """When every alternative refused only a tag (`kind: lorra` matches no adapter kind): the
    value, the tags that exist and the closest one."""
    tags = [match for leaf in leaves if (match := _LITERAL.match(leaf.message))]
    if not tags or len(tags) != len(leaves):
        return None
    allowed = [value.strip().strip("'") for match in tags for value in match.group(1).split(",")]
    given = tags[0].group(2).strip()
    where = ".".join(leaves[0].path).removesuffix(".init_args")
    return f"{where}: {given!r} is not one of {allowed}{_closest(given, allowed)}"


def _with_init_args(stack: list[tuple[int, str | None, str | None]]) -> list[str]:
    """Keys as a user writes them: a subclass-mode class's options sit under its `init_args`
    (a dataclass's sit directly under its key)."""
    path = []
    for _, key, owner in stack:
        if key:
            path.extend(key.split("."))
        if owner and path and not _is_dataclass(owner):
            path.append("init_args")
    return path


def _import(class_path: str):
    from jsonargparse._util import import_object

    try:
        return import_object(class_path)
    except Exception:  # an unimportable path in a message: treat it as unknown
        return None


def _is_dataclass(class_path: str) -> bool:
    return dataclasses.is_dataclass(_import(class_path))


def _options_of(class_path: str) -> list[str]:
    """The option names a class accepts, as jsonargparse sees them (dataclass fields or __init__)."""
    from jsonargparse import ArgumentParser

    try:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(_import(class_path), nested_key=None, fail_untyped=False)
    except Exception:  # an unimportable or unusual class: no suggestions rather than a crash
        return []
    return sorted({action.dest.split(".")[0] for action in parser._actions if action.dest != "help"})


def _closest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; valid: {', '.join(known)}" if known and len(known) <= 30 else ""


def one_line(error: BaseException, known_keys: list[str] | None = None) -> str:
    """The `error:` line (without the prefix) for a jsonargparse parse or instantiation error.

    `known_keys`: the dotted option names of the parser (for unknown top-level options).
    """
    leaves = _leaves(str(error))
    if tag_error := _not_one_of(leaves):
        return tag_error
    leaves = [leaf for leaf in leaves if not _LITERAL.match(leaf.message)]
    if not leaves:
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    leaf = leaves[0]
    where = ".".join(leaf.path).removesuffix(".init_args")
    if match := _UNKNOWN_OPTION.match(leaf.message):
        option = match.group(1)
        owner = leaf.owner.rsplit(".", 1)[-1] if leaf.owner else "this class"
        hint = _closest(option, _options_of(leaf.owner)) if leaf.owner else ""
        return f"{where}: unknown option {option!r} of {owner}{hint}"
    if match := _UNRECOGNIZED.match(leaf.message):
        option = match.group(1).split()[0].split("=")[0]
        hint = _closest(option.lstrip("-"), known_keys or [])
        return f"unknown option {option}{hint}"
    if match := _SUBCOMMAND_OPTION.match(leaf.message):
        key = match.group(1)
        top = key.split(".")[0]
        tops = sorted({k.split(".")[0] for k in known_keys or []})
        if top not in tops:
            return f"unknown key {top!r} (in {key!r}){_closest(top, tops)}"
        return f"unknown key {key!r}{_closest(key, known_keys or [])}"
    if match := _MISSING_FILE.match(leaf.message):
        return f"config file {match.group(1)} does not exist"
    return f"{where}: {leaf.message}" if where else leaf.message
