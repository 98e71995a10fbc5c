"""``--config run.yaml``: every flag of `dpo-fast train` / `dpo-fast sft` from a YAML file.

The keys are the flag names without the leading ``--``, spelt with ``-`` or ``_`` (``load-in-4bit: true``,
``max_length: 512``; the convention of TRL's CLI and Axolotl). Flags given on the command line override the
file. An unknown key or a value of the wrong kind is a `UserError` naming the key (with the closest flag
names). The effective configuration (file and command line merged, every flag) is what `effective_config`
returns: written to ``OUTPUT/config.yaml`` by a run and printed by ``--print-config``; it can be passed
back to ``--config`` to repeat the run.
"""
from __future__ import annotations

import argparse
import difflib
import os
from typing import Any, Dict, List, Optional, Sequence

from dpo_fast.errors import UserError

CONFIG_FILE_NAME = "config.yaml"
#: command-line-only flags: not read from the file, not part of the effective configuration
_OWN_FLAGS = ("--config", "--print-config", "--debug")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config and --print-config."""
    g = parser.add_argument_group("config file")
    g.add_argument("--config", default=None, metavar="YAML",
                   help="read flags from this YAML file (keys: flag names without --, with - or _); flags on the "
                        f"command line override it; the merged configuration is written to OUTPUT/{CONFIG_FILE_NAME}")
    g.add_argument("--print-config", action="store_true",
                   help="print the effective configuration (YAML, loadable with --config) and exit")


def config_path(argv: Sequence[str]) -> Optional[str]:
    """The value of --config in `argv` (the last one wins, as argparse does), or None."""
    found = None
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == "--config" and i + 1 < len(argv):
            found = argv[i + 1]
        elif token.startswith("--config="):
            found = token.split("=", 1)[1]
    return found


def _flag_actions(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    """The parser's flags by key (long option name without --, '-' as '_'), --help / --config excluded."""
    out = {}
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or isinstance(action, argparse._HelpAction) or longs[0] in _OWN_FLAGS:
            continue
        out[longs[0][2:].replace("-", "_")] = action
    return out


def read_yaml(path: str) -> Dict[str, Any]:
    """The mapping at the top of a YAML file; UserError for a missing file, bad YAML or another top level."""
    import yaml

    if not os.path.isfile(path):
        raise UserError(f"--config: no such file: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"--config: {path}{where}: not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config: {path} holds a YAML {type(data).__name__}; expected a mapping of flag names "
                        "to values (e.g. `model: org/name`)")
    return data


def _kind(action: argparse.Action) -> str:
    if isinstance(action, argparse._StoreTrueAction):
        return "flag"
    if isinstance(action, argparse._AppendAction):
        return "list"
    if action.nargs == "?":
        return "optional"
    return "value"


def _convert_one(action: argparse.Action, key: str, value: Any, where: str) -> Any:
    """One value as argparse would have made it from the command line (its type applied, choices checked)."""
    if isinstance(value, (dict, list)) or isinstance(value, bool):
        raise UserError(f"{where}: {key}: expected a single value, got {value!r}")
    if action.type is not None:
        try:
            value = action.type(str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            name = getattr(action.type, "__name__", "value")
            raise UserError(f"{where}: {key}: expected {'a number' if name in ('int', 'float') else name}"
                            f"{' (an integer)' if name == 'int' else ''}, got {value!r} ({exc})") from None
    else:
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{where}: {key}: must be one of {list(action.choices)}, got {value!r}")
    return value


def _convert(action: argparse.Action, key: str, value: Any, where: str) -> Any:
    kind = _kind(action)
    if kind == "flag":
        if not isinstance(value, bool):
            raise UserError(f"{where}: {key}: expected true or false, got {value!r}")
        return value
    if kind == "optional":  # --resume: true / false / a checkpoint dir
        return value if isinstance(value, bool) else _convert_one(action, key, value, where)
    if kind == "list":
        if isinstance(value, dict):  # --loss-kwarg as a mapping: {simpo_gamma: 0.7}
            return [(str(k), v) for k, v in value.items()]
        items = value if isinstance(value, list) else [value]
        out = []
        for item in items:
            if isinstance(item, (dict, list)) or isinstance(item, bool):
                raise UserError(f"{where}: {key}: expected a list of values, got {value!r}")
            out.append(action.type(str(item)) if action.type is not None else str(item))
        return out
    return _convert_one(action, key, value, where)


def apply_config(parser: argparse.ArgumentParser, values: Dict[str, Any], path: str) -> Dict[str, List[Any]]:
    """Make the file's `values` the defaults of `parser`'s flags (so the command line overrides them).

    Returns the list-valued flags (repeatable ones, e.g. --loss-type) to fill in after parsing when the command
    line gave none: argparse would otherwise add the command line's items to the file's instead of replacing them.
    """
    actions = _flag_actions(parser)
    later: Dict[str, List[Any]] = {}
    for raw_key, value in values.items():
        key = str(raw_key).lstrip("-").replace("-", "_")
        action = actions.get(key)
        if action is None and "--" + key.replace("_", "-") in _OWN_FLAGS:
            raise UserError(f"--config: {path}: {str(raw_key)!r} is a command-line option only; drop it from the "
                            f"file and pass --{key.replace('_', '-')} on the command line")
        if action is None:
            close = difflib.get_close_matches(key, list(actions), n=3, cutoff=0.6)
            hint = (f"; did you mean {' or '.join(repr(c.replace('_', '-')) for c in close)}?" if close
                    else "; the keys are the flags of `dpo-fast " + parser.prog.split()[-1] + " --help` without --")
            raise UserError(f"--config: {path}: unknown key {str(raw_key)!r}{hint}")
        if value is None:
            continue  # `key: null` leaves the flag at its default
        converted = _convert(action, key.replace("_", "-"), value, f"--config: {path}")
        action.required = False
        if _kind(action) == "list":
            later[action.dest] = converted
        else:
            action.default = converted
    return later


def fill_lists(args: argparse.Namespace, later: Dict[str, List[Any]]) -> None:
    """The file's repeatable flags where the command line gave none (see `apply_config`)."""
    for dest, items in later.items():
        if getattr(args, dest, None) in (None, []):
            setattr(args, dest, list(items))


def effective_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Dict[str, Any]:
    """Every flag's value after the file and the command line, by flag name (loadable with --config)."""
    out: Dict[str, Any] = {}
    for key, action in _flag_actions(parser).items():
        value = getattr(args, action.dest, None)
        if _kind(action) == "list" and value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
            value = {k: v for k, v in value}  # --loss-kwarg KEY=VALUE pairs as a mapping
        elif isinstance(value, tuple):
            value = list(value)
        out[key.replace("_", "-")] = value
    return out


def to_yaml(config: Dict[str, Any], command: str) -> str:
    """The effective configuration as YAML text, with a header saying how to reuse it."""
    import yaml

    header = (f"# dpo-fast {command}: effective configuration (config file and command line merged).\n"
              f"# Repeat the run with: dpo-fast {command} --config THIS_FILE\n")
    return header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False, allow_unicode=True)


def write_config(config: Dict[str, Any], command: str, output: str) -> str:
    """Write OUTPUT/config.yaml; returns its path."""
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, CONFIG_FILE_NAME)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(to_yaml(config, command))
    return path
