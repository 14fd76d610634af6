"""One style for the command-line tools (``prepare``, ``describe``, ``tokenizer``): the options are a function's
parameters, read by jsonargparse, so ``--help`` comes from the signature and docstring, and ``--config FILE.yaml``
can hold any of them (the command line overrides the file).

Beyond jsonargparse's defaults, every tool accepts:
- an option spelled with dashes: ``--text-key`` is ``--text_key``;
- a boolean option given bare: ``--resume`` is ``--resume true`` (also for an optional one, default null);
- several values after a ``list[str]`` option: ``--input a.txt b.txt`` (in a config file: a YAML list);
- the parameters named in ``positional`` as positional arguments.

:func:`run` parses, calls the function and turns the outcome into an exit status: 0; 1 when the function raised
one of ``errors`` (printed as one line, no traceback) or the result is not ``ok``; 130 on Ctrl-C. argparse's own
usage errors exit with 2.
"""

from __future__ import annotations

import inspect
import sys
import typing
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

EPILOG = "Options may also be spelled with dashes (--text-key), and a bare boolean option means true (--resume)."


def _is_str_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (list, Sequence) and typing.get_args(annotation) == (str,)


def _describe(fn: Callable) -> tuple[str, dict[str, str]]:
    """A function's description and per-parameter help from its Google-style docstring."""
    import docstring_parser

    doc = docstring_parser.parse(inspect.getdoc(fn) or "")
    text = "\n\n".join(p for p in (doc.short_description, doc.long_description) if p)
    return text, {p.arg_name: p.description or "" for p in doc.params}


def build_parser(fn: Callable, prog: Optional[str] = None, positional: Sequence[str] = ()):
    """A jsonargparse parser for ``fn``'s parameters (see the module docstring)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    description, helps = _describe(fn)
    parser = ArgumentParser(prog=prog, description=description, epilog=EPILOG)
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML/JSON file with any of the options.")
    hints = typing.get_type_hints(fn)
    params = inspect.signature(fn).parameters
    positional = [n for n in positional if n in params]
    lists = [n for n in params if _is_str_list(hints.get(n)) and n not in positional]
    parser.add_function_arguments(fn, as_group=False, skip=set(lists) | set(positional))
    for name in positional:
        parser.add_argument(name, help=helps.get(name, ""))
    for name in lists:
        p = params[name]
        required = p.default is inspect.Parameter.empty
        kwargs = {} if required else {"default": list(p.default)}
        parser.add_argument(f"--{name}", nargs="+", required=required, help=helps.get(name, ""), **kwargs)
    for action in parser._actions:
        if hints.get(action.dest) in (bool, Optional[bool]):  # a bare --flag means true
            action.nargs, action.const = "?", True
        for option in list(action.option_strings):
            if option.startswith("--") and "_" in option:  # accepted, not listed in --help
                parser._option_string_actions.setdefault(option.replace("_", "-"), action)
    return parser


def parse(fn: Callable, argv: Sequence[str], prog: Optional[str] = None,
          positional: Sequence[str] = ()) -> dict[str, Any]:
    """The keyword arguments for ``fn`` given on the command line ``argv``."""
    cfg = build_parser(fn, prog, positional).parse_args(list(argv)).as_dict()
    cfg.pop("config", None)
    return cfg


def run(commands: Union[Callable, dict[str, Callable]], argv: Optional[Sequence[str]] = None,
        prog: Optional[str] = None, positional: Sequence[str] = (),
        errors: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError),
        interrupted: str = "interrupted", ok: Callable[[Any], bool] = lambda result: True) -> int:
    """Parse ``argv``, call the function (or the chosen subcommand's: ``{"train": train, ...}``) and return the
    exit status. ``interrupted`` (if any) is printed on Ctrl-C; ``ok(result)`` False makes the status 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = prog or "command"
    fn = commands
    if isinstance(commands, dict):
        usage = f"usage: {name} {{{','.join(commands)}}} [--help] ..."
        if not argv or argv[0] not in commands:
            if argv and argv[0] in ("-h", "--help"):
                print(usage + "\n\n" + "\n".join(f"  {sub:8s} {_describe(f)[0].splitlines()[0]}"
                                                for sub, f in commands.items()))
                return 0
            print(f"{usage}\n{name}: error: choose one of {', '.join(commands)}", file=sys.stderr)
            return 2
        fn, name, argv = commands[argv[0]], f"{name} {argv[0]}", argv[1:]
    kwargs = parse(fn, argv, name, positional)
    try:
        result = fn(**kwargs)
    except KeyboardInterrupt:
        if interrupted:
            print(f"\n{name}: {interrupted}", file=sys.stderr)
        return 130
    except errors as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    return 0 if ok(result) else 1
