"""Dataclass configurations on the command line and in YAML files.

A trainer declares its options once, as a dataclass; every field becomes a ``--kebab-case`` option::

    @dataclass
    class TrainConfig:
        dataset: str = field(default="digits", metadata={"choices": ["sop", "digits"], "help": "dataset"})
        memory_size: str = field(default="0.5", metadata={"type": str, "help": "N rows or a fraction"})
        lr: float = 1e-4
        amp: bool = True                                   # --amp / --no-amp
        resume: str = field(default="", metadata={"nargs": "?", "const": "auto"})  # bare --resume -> "auto"
        wandb_project: Optional[str] = None                # --wandb-project none -> None

    cfg = parse_config(TrainConfig, argv, prog="xbn-metric")
    save_config(cfg, out / "config.yaml")                  # re-runnable with --config out/config.yaml

Supported field types: ``int``, ``float``, ``str``, ``bool`` (``--x``, ``--no-x``, and ``--x=true|false``
as ``wandb agent`` passes it, see :class:`BoolAction`), ``pathlib.Path``,
``Optional[...]`` of those (the strings ``none``/``null`` give ``None``), ``Literal[...]`` (becomes
``choices``), ``list[X]`` / ``tuple[X, ...]`` (``nargs="*"``), and unions such as ``Union[int, float]``
(members are tried most specific first: bool, int, float, other types, str). Field ``metadata`` keys: ``help``, ``choices``,
``type`` (a converter overriding the annotation, e.g. ``str`` for a value the trainer interprets later),
``nargs``, ``const``, ``metavar``, ``aliases`` (extra flags, e.g. ``["-o"]``), ``hidden_aliases`` (old
spellings still accepted on the command line and in YAML, not shown in ``--help``), ``range`` (a
:class:`xbn_queue.training.cli.Range`, shown in ``--help`` and enforced by
:func:`xbn_queue.training.cli.check_ranges`), ``check`` (a rule ``check(option, value)`` that a range
cannot say, enforced by ``check_ranges`` too; :mod:`xbn_queue.training.memory` declares the memory
options' bounds this way) and ``group`` (help section). A default is shown in the
help once: not appended when the help text already mentions one, nor when it is ``None``.

Command-line errors (an unknown option, a value of the wrong type) print one line
``PROG: error: ...`` and exit with status 2, without the long usage text.

``--config FILE.yaml`` reads a mapping whose keys are field names, written with ``_`` or ``-``; an
unknown key is a ``ValueError`` naming the key and the file. Precedence: dataclass defaults < YAML <
options given explicitly on the command line (even when equal to the default). Values in YAML are
converted like command-line strings (PyYAML reads ``1e-4`` as a string; it becomes a float here).

Subcommands stay with the caller: ``if argv[:1] == ["compare"]: parse_config(cls, argv[1:], prog=...)``.
To add options that are not config fields, pass ``extra_args=`` a function that receives the parser;
``parse_config`` then returns ``(cfg, extras)`` where ``extras`` is an ``argparse.Namespace`` holding
only those options::

    def add_compare(p):
        p.add_argument("--methods", default="none,xbm,xbn,axbn")
        p.add_argument("--seeds", type=int, default=3)

    cfg, extras = parse_config(TrainConfig, argv, prog="xbn-metric compare", extra_args=add_compare)

Reading and writing YAML needs PyYAML (``pip install "xbn-queue[train]"``); parsing a command line
without ``--config`` does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, Optional, TypeVar, Union, overload

from xbn_queue.training._optional import require

__all__ = [
    "parse_config",
    "build_parser",
    "config_from_namespace",
    "config_from_dict",
    "config_to_dict",
    "config_to_argv",
    "save_config",
    "load_config",
    "parse_option_value",
]

T = TypeVar("T")
PathLike = Union[str, "os.PathLike[str]"]

_TRUE = {"true", "yes", "on", "1", "y", "t"}
_FALSE = {"false", "no", "off", "0", "n", "f"}
_NONE = {"none", "null", "~"}
_REQUIRED = object()
# typing.Union[...] and, on Python >= 3.10, ``X | Y``.
_UNION_ORIGINS = (Union, getattr(types, "UnionType", Union))


@dataclasses.dataclass
class _Spec:
    """How one dataclass field is parsed."""

    name: str
    kind: str  # "bool" | "scalar" | "list"
    convert: Callable[[str], Any]  # converts one command-line string (one element for lists)
    optional: bool
    choices: Optional[list[Any]]
    container: type = list
    default: Any = _REQUIRED


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"expected a boolean (true/false/yes/no/1/0), got {text!r}")


def _union_converter(members: Sequence[Any]) -> Callable[[str], Any]:
    # Most specific first: bool, int, float, then the others, str last. Not the declared order:
    # typing caches unions by equality, so ``Union[int, float]`` may come back as an earlier
    # ``Union[float, int]`` and "64" must still parse as the integer 64.
    rank = {bool: 0, int: 1, float: 2, str: 4}
    members = sorted(members, key=lambda m: rank.get(m, 3))
    convs = [_scalar_converter(m) for m in members]

    def convert(text: str) -> Any:
        for conv in convs:
            try:
                return conv(text)
            except (ValueError, TypeError):
                continue
        raise ValueError(f"{text!r} is none of {convert.__name__}")

    convert.__name__ = "|".join(getattr(m, "__name__", str(m)) for m in members)
    return convert


def _scalar_converter(tp: Any) -> Callable[[str], Any]:
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    if isinstance(tp, type) and issubclass(tp, PurePath):
        return Path
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        enum_tp = tp

        def convert_enum(text: str) -> Any:
            for member in enum_tp:
                if text in (member.name, str(member.value)):
                    return member
            raise ValueError(f"{text!r} is not one of {[m.name for m in enum_tp]}")

        convert_enum.__name__ = tp.__name__
        return convert_enum
    if typing.get_origin(tp) in _UNION_ORIGINS:
        return _union_converter(typing.get_args(tp))
    raise TypeError(f"unsupported type {tp!r}")


def _analyze(f: dataclasses.Field, tp: Any) -> _Spec:
    """Turn a dataclass field and its resolved annotation into a :class:`_Spec`."""
    meta = f.metadata or {}
    optional = False
    origin = typing.get_origin(tp)
    if origin in _UNION_ORIGINS:
        args = typing.get_args(tp)
        if type(None) in args:
            optional = True
            rest = [a for a in args if a is not type(None)]
            tp = rest[0] if len(rest) == 1 else Union[tuple(rest)]  # type: ignore[assignment]
            origin = typing.get_origin(tp)
    choices = list(meta["choices"]) if "choices" in meta else None
    kind = "scalar"
    container: type = list
    if "type" in meta:
        convert = meta["type"]
    elif tp is bool:
        kind, convert = "bool", _parse_bool
    elif origin is Literal:
        values = typing.get_args(tp)
        choices = list(values) if choices is None else choices
        convert = _union_converter(sorted({type(v) for v in values}, key=lambda t: t.__name__))
        if all(isinstance(v, str) for v in values):
            convert = str
    elif origin in (list, tuple, Sequence, typing.List, typing.Tuple) or tp in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if len(set(args)) > 1:
            raise TypeError(f"field {f.name!r}: only homogeneous list/tuple types are supported, got {tp!r}")
        kind = "list"
        container = tuple if (origin is tuple or tp is tuple) else list
        convert = _scalar_converter(args[0]) if args else str
    else:
        try:
            convert = _scalar_converter(tp)
        except TypeError as err:
            raise TypeError(
                f"field {f.name!r} has type {tp!r}, which parse_config cannot read from a command line; "
                'declare a converter with field(metadata={"type": str}) (or int, float, ...)'
            ) from err
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = f.default_factory()  # type: ignore[misc]
    else:
        default = _REQUIRED
    if default is None:
        optional = True
    return _Spec(f.name, kind, convert, optional, choices, container, default)


def _specs(cls: type) -> dict[str, _Spec]:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"expected a dataclass type, got {cls!r}")
    module = sys.modules.get(cls.__module__)
    hints = typing.get_type_hints(cls, globalns=vars(module) if module else None)
    specs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name == "config":
            raise TypeError("a config dataclass cannot have a field named 'config' (it is the --config option)")
        specs[f.name] = _analyze(f, hints[f.name])
    return specs


class _NoneOrChoices(list):
    """The choices of an optional field: ``none`` (converted to ``None`` before argparse checks the choice)
    is accepted too, so that ``config_to_argv``'s ``--x none`` parses back; ``--help`` lists the choices only."""

    def __contains__(self, value: object) -> bool:
        return value is None or list.__contains__(self, value)


class BoolAction(argparse.Action):
    """A boolean option: ``--x``, ``--no-x``, and ``--x=VALUE`` (``--x VALUE``) with VALUE one of
    true/false, True/False, yes/no, on/off, 1/0 (what ``wandb agent`` passes: ``--x=False``).

    For an ``Optional[bool]`` field ``--x=none`` gives ``None``. Any other value is a one-line error
    naming the option (exit status 2).
    """

    def __init__(self, option_strings: Sequence[str], dest: str, optional: bool = False, **kwargs: Any) -> None:
        names: list[str] = []
        for flag in option_strings:
            names.append(flag)
            if flag.startswith("--"):
                names.append("--no-" + flag[2:])
        self.optional = optional
        kwargs.setdefault("metavar", "true|false")
        super().__init__(names, dest, nargs="?", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        negated = bool(option_string) and option_string.startswith("--no-")
        if negated:
            if values is not None:
                parser.error(f"argument {option_string}: takes no value (write --{option_string[5:]}={values})")
            setattr(namespace, self.dest, False)
            return
        if values is None:
            setattr(namespace, self.dest, True)
            return
        if self.optional and values.strip().lower() in _NONE:
            setattr(namespace, self.dest, None)
            return
        try:
            setattr(namespace, self.dest, _parse_bool(values))
        except ValueError:
            parser.error(f"argument {option_string}: invalid boolean {values!r} (expected true or false, "
                         "True or False, yes or no, 1 or 0)")

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--amp[=true|false], --no-amp`` for a :class:`BoolAction` in ``--help``."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, BoolAction):
            return ", ".join(f"{flag}[={action.metavar}]" if not flag.startswith("--no-") else flag
                             for flag in action.option_strings)
        return super()._format_action_invocation(action)


class _OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``PROG: error: ...``), exit status 2."""

    def error(self, message: str) -> "typing.NoReturn":  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _means_none(spec: _Spec, text: str) -> bool:
    """``none`` / ``null`` / ``~`` give ``None`` for an optional field, unless the word is one of its choices
    (``--head none`` is the choice ``"none"``, not "unset")."""
    if not spec.optional or text.strip().lower() not in _NONE:
        return False
    return spec.choices is None or text.strip() not in spec.choices


def _cli_converter(spec: _Spec) -> Callable[[str], Any]:
    if not spec.optional:
        return spec.convert

    def convert(text: str) -> Any:
        return None if _means_none(spec, text) else spec.convert(text)

    convert.__name__ = getattr(spec.convert, "__name__", "value")
    return convert


def _help_text(spec: _Spec, meta: Mapping[str, Any]) -> str:
    """A field's ``--help`` line: its help, then ``(required)`` or the default (once), then ``[valid: RANGE]``."""
    text = str(meta.get("help", ""))
    if spec.default is _REQUIRED:
        text = f"{text} (required)".strip()
    elif spec.default is not None and "default" not in text.lower():
        shown = spec.default if not isinstance(spec.default, str) or spec.default else '""'
        text = f"{text} (default: {shown})".strip()
    if meta.get("range") is not None:
        text = f"{text} [valid: {meta['range']}]"
    return text.replace("%", "%%")


def _argument_kwargs(name: str, spec: _Spec, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The ``add_argument`` keywords of a field's option (``default=SUPPRESS``: only given options reach the namespace)."""
    kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": _help_text(spec, meta)}
    if spec.kind == "bool":
        kwargs.update(action=BoolAction, optional=spec.optional)
        return kwargs
    kwargs["type"] = _cli_converter(spec)
    if spec.choices is not None:
        kwargs["choices"] = _NoneOrChoices(spec.choices) if spec.optional else spec.choices
    if spec.kind == "list":
        kwargs["nargs"] = meta.get("nargs", "*")
    elif "nargs" in meta:
        kwargs["nargs"] = meta["nargs"]
    if "const" in meta:
        kwargs["const"] = meta["const"]
    if "metavar" in meta:
        kwargs["metavar"] = meta["metavar"]
    elif spec.choices is None:
        kwargs["metavar"] = name.upper()
    return kwargs


def build_parser(
    cls: type,
    prog: Optional[str] = None,
    description: Optional[str] = None,
    parser: Optional[argparse.ArgumentParser] = None,
    epilog: Optional[str] = None,
) -> argparse.ArgumentParser:
    """Build an ``argparse`` parser with one option per field of ``cls`` plus ``--config``.

    Field options use ``default=argparse.SUPPRESS``, so the parsed namespace holds only options that
    were given explicitly; turn it into a config with :func:`config_from_namespace`. Add any other
    options to the returned parser as usual.

    Args:
        cls: The config dataclass.
        prog: Program name shown in usage.
        description: Help text; defaults to the dataclass docstring's first paragraph.
        parser: An existing parser (e.g. a subparser) to add the options to.
        epilog: Text after the options in ``--help`` (shown as written).

    Returns:
        The parser.

    Raises:
        TypeError: If ``cls`` is not a dataclass or a field type is unsupported.
    """
    specs = _specs(cls)
    if parser is None:
        if description is None and cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            description = cls.__doc__.strip().split("\n\n")[0]
        parser = _OneLineParser(prog=prog, description=description, epilog=epilog, formatter_class=_HelpFormatter)
    parser.add_argument(
        "--config", metavar="FILE.yaml", default=None,
        help="YAML file of option values (keys are the option names with _ or -); "
        "options given on the command line override it",
    )
    groups: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, spec in specs.items():
        meta = fields[name].metadata or {}
        target: Any = parser
        if "group" in meta:
            target = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        kwargs = _argument_kwargs(name, spec, meta)
        target.add_argument("--" + name.replace("_", "-"), *meta.get("aliases", []), **kwargs)
        hidden = ["--" + a.lstrip("-").replace("_", "-") for a in meta.get("hidden_aliases", [])]
        if hidden:
            target.add_argument(*hidden, **dict(kwargs, help=argparse.SUPPRESS))
    return parser


def _coerce(spec: _Spec, value: Any, where: str) -> Any:
    """Convert a value read from YAML / a dict to the field's type; raise ValueError naming ``where``."""

    def fail(reason: str) -> ValueError:
        return ValueError(f"{where}: invalid value {value!r} for '{spec.name}': {reason}")

    def one(v: Any) -> Any:
        if v is None:
            if spec.optional:
                return None
            raise fail("None is not allowed for this option")
        if isinstance(v, str):
            if _means_none(spec, v):
                return None
            try:
                return spec.convert(v)
            except (ValueError, TypeError) as err:
                raise fail(str(err)) from err
        conv = spec.convert
        if conv is _parse_bool:
            if isinstance(v, bool):
                return v
            if isinstance(v, int) and v in (0, 1):
                return bool(v)
            raise fail("expected a boolean")
        if isinstance(v, bool):
            raise fail("a boolean is not allowed for this option")
        if conv is str:
            return str(v)
        if conv is float and isinstance(v, (int, float)):
            return float(v)
        if conv is int:
            if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
                return int(v)
            raise fail("expected an integer")
        if isinstance(conv, type) and isinstance(v, conv):
            return v
        try:
            return conv(str(v))
        except (ValueError, TypeError) as err:
            raise fail(str(err)) from err

    if spec.kind == "list":
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        out = spec.container(one(v) for v in items)
        bad = [v for v in out if spec.choices is not None and v not in spec.choices]
    else:
        out = one(value)
        bad = [out] if spec.choices is not None and out is not None and out not in spec.choices else []
    if bad:
        raise fail(f"choose from {spec.choices}")
    return out


def _aliases(cls: type) -> dict[str, str]:
    """``{old_name: field_name}`` from the fields' ``hidden_aliases``."""
    out = {}
    for f in dataclasses.fields(cls):
        for a in (f.metadata or {}).get("hidden_aliases", []):
            out[a.lstrip("-").replace("-", "_")] = f.name
    return out


def _normalize_keys(data: Mapping[str, Any], specs: Mapping[str, _Spec], where: str,
                    aliases: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        name = (aliases or {}).get(name, name)
        if name not in specs:
            raise ValueError(f"{where}: unknown key '{key}' (valid keys: {', '.join(sorted(specs))})")
        if name in out:
            raise ValueError(f"{where}: key '{key}' is given twice (as '_' and '-' spellings)")
        out[name] = _coerce(specs[name], value, where)
    return out


def _read_yaml(path: PathLike) -> dict[str, Any]:
    yaml = require("yaml", "Reading a --config YAML file")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ValueError(f"{path}: not a valid YAML file{where}: {problem}") from None
    except (UnicodeDecodeError, IsADirectoryError) as err:
        raise ValueError(f"{path}: not a readable YAML file ({type(err).__name__})") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    return dict(data)


def config_from_dict(cls: type[T], data: Mapping[str, Any], source: str = "config") -> T:
    """Build ``cls`` from a dict of field values (keys with ``_`` or ``-``) on top of the defaults.

    Args:
        cls: The config dataclass.
        data: Field values; converted like YAML values.
        source: Name used in error messages (e.g. the file name).

    Returns:
        The config instance.

    Raises:
        ValueError: On an unknown key, an invalid value, or a missing required field.
    """
    specs = _specs(cls)
    values = {n: s.default for n, s in specs.items() if s.default is not _REQUIRED}
    values.update(_normalize_keys(data, specs, source, _aliases(cls)))
    missing = [n for n in specs if n not in values]
    if missing:
        raise ValueError(f"{source}: missing required option(s): {', '.join(missing)}")
    return cls(**values)


def config_from_namespace(cls: type[T], ns: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> T:
    """Combine defaults, the ``--config`` YAML file and explicit options of a parsed namespace.

    Args:
        cls: The config dataclass.
        ns: Namespace from a parser made by :func:`build_parser`.
        parser: If given, a missing required option is reported with ``parser.error`` (exit status 2).

    Returns:
        The config instance.

    Raises:
        ValueError: On an unknown key or invalid value in the YAML file, or a missing required option
            when no ``parser`` is given.
    """
    specs = _specs(cls)
    values = {n: s.default for n, s in specs.items() if s.default is not _REQUIRED}
    config_file = getattr(ns, "config", None)
    if config_file:
        values.update(_normalize_keys(_read_yaml(config_file), specs, str(config_file), _aliases(cls)))
    for name in specs:
        if hasattr(ns, name):
            value = getattr(ns, name)
            if specs[name].kind == "list" and isinstance(value, (list, tuple)):
                value = specs[name].container(value)
            values[name] = value
    missing = ["--" + n.replace("_", "-") for n in specs if n not in values]
    if missing:
        message = f"the following arguments are required: {', '.join(missing)}"
        if parser is not None:
            parser.error(message)
        raise ValueError(message)
    return cls(**values)


@overload
def parse_config(
    cls: type[T], argv: Optional[Sequence[str]] = ..., prog: Optional[str] = ...,
    description: Optional[str] = ..., extra_args: None = ..., epilog: Optional[str] = ...,
) -> T: ...
@overload
def parse_config(
    cls: type[T], argv: Optional[Sequence[str]] = ..., prog: Optional[str] = ...,
    description: Optional[str] = ..., extra_args: Callable[[argparse.ArgumentParser], Any] = ...,
    epilog: Optional[str] = ...,
) -> tuple[T, argparse.Namespace]: ...
def parse_config(
    cls: type[T],
    argv: Optional[Sequence[str]] = None,
    prog: Optional[str] = None,
    description: Optional[str] = None,
    extra_args: Optional[Callable[[argparse.ArgumentParser], Any]] = None,
    epilog: Optional[str] = None,
) -> Union[T, tuple[T, argparse.Namespace]]:
    """Parse a command line into the config dataclass ``cls``.

    Args:
        cls: The config dataclass.
        argv: Arguments without the program name; ``None`` reads ``sys.argv[1:]``.
        prog: Program name for usage and errors (e.g. ``"xbn-metric compare"``).
        description: Help text.
        extra_args: Optional function that adds non-config options to the parser. When given, the
            result is ``(cfg, extras)`` with ``extras`` an ``argparse.Namespace`` of only those options
            (with their argparse defaults).
        epilog: Text after the options in ``--help``.

    Returns:
        ``cfg``, or ``(cfg, extras)`` when ``extra_args`` is given.

    Raises:
        SystemExit: On command-line errors and ``--help`` (argparse behaviour).
        ValueError: On an unknown key or invalid value in the ``--config`` file (naming key and file),
            or when the dataclass rejects the values.
        FileNotFoundError: If the ``--config`` file does not exist.
    """
    parser = build_parser(cls, prog=prog, description=description, epilog=epilog)
    own = {a.dest for a in parser._actions}
    if extra_args is not None:
        extra_args(parser)
    ns = parser.parse_args(None if argv is None else list(argv))
    cfg = config_from_namespace(cls, ns, parser)
    if extra_args is None:
        return cfg
    extras = argparse.Namespace(**{k: v for k, v in vars(ns).items() if k not in own})
    return cfg, extras


def _plain(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return _plain(value.value, where)
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, where) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name), where) for f in dataclasses.fields(value)}
    if callable(getattr(value, "item", None)) and tuple(getattr(value, "shape", (None,))) == ():
        return _plain(value.item(), where)  # numpy scalars, 0-d tensors
    raise TypeError(f"config field {where!r} holds {type(value).__name__}, which is not a plain YAML type")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Return the config's init fields as a dict of plain Python types (str, int, float, bool, None, list, dict).

    ``Path`` becomes ``str``, tuples become lists, enums their value.

    Args:
        cfg: A dataclass instance.

    Returns:
        ``{field_name: value}`` in declaration order.

    Raises:
        TypeError: If ``cfg`` is not a dataclass instance or a value has no plain equivalent.
    """
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a dataclass instance, got {cfg!r}")
    return {f.name: _plain(getattr(cfg, f.name), f.name) for f in dataclasses.fields(cfg) if f.init}


def parse_option_value(cls: type, name: str, text: str) -> Any:
    """One command-line value of the field ``name`` of the dataclass ``cls``, converted as ``--name TEXT`` is.

    For a program that takes option values itself (``sweep --vary lr=1e-4,1e-3``). Ranges are not
    checked here (:func:`xbn_queue.training.cli.check_ranges` does that on a config).

    Raises:
        KeyError: ``name`` is not a field of ``cls``.
        ValueError: ``text`` is not a value of the field (wrong type, not one of its choices), or the
            field is a list.
    """
    spec = _specs(cls)[name]
    if spec.kind == "list":
        raise ValueError("a list option cannot take one value")
    value = _cli_converter(spec)(text)
    if spec.choices is not None and value is not None and value not in spec.choices:
        raise ValueError(f"expected one of {', '.join(map(str, spec.choices))}")
    return value


def config_to_argv(cfg: Any, only_changed: bool = False) -> list[str]:
    """The command line that :func:`parse_config` turns back into ``cfg``.

    The inverse of :func:`parse_config` for launching a run in another process (``torchrun``, a
    subprocess, a cluster job): booleans become ``--x`` / ``--no-x``, lists one option followed by
    their items, ``None`` the word ``none``.

    Args:
        cfg: A dataclass instance.
        only_changed: Leave out fields equal to their dataclass default.

    Returns:
        ``["--field-name", "value", ...]`` in declaration order.

    Raises:
        TypeError: If ``cfg`` is not a dataclass instance or a value has no plain equivalent.
    """
    specs = _specs(type(cfg))
    argv: list[str] = []
    for name, value in config_to_dict(cfg).items():
        spec = specs[name]
        if (only_changed or value is None) and spec.default is not _REQUIRED and value == _plain(spec.default, name):
            continue  # (a None default is left out always: "--head none" would be the choice "none")
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        elif value is None:
            argv += [flag, "none"]
        elif isinstance(value, list):
            argv += [flag, *(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def save_config(cfg: Any, path: PathLike) -> Path:
    """Write the resolved config as YAML (plain types only), re-loadable with ``--config``.

    The file is written to a temporary name and renamed, so it is never half-written.

    Args:
        cfg: A dataclass instance.
        path: Destination (parent directories are created).

    Returns:
        ``path`` as a ``Path``.
    """
    yaml = require("yaml", "Writing config.yaml")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_config(cls: type[T], path: PathLike) -> T:
    """Read a YAML file written by :func:`save_config` (or by hand) into ``cls``.

    Missing keys take the dataclass defaults.

    Args:
        cls: The config dataclass.
        path: YAML file.

    Returns:
        The config instance.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: On an unknown key or an invalid value (naming key and file).
    """
    return config_from_dict(cls, _read_yaml(path), source=str(path))
