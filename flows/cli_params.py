"""Command-line flags made from the stage parameter models: `--<stage>.<field>` for every field, checked by pydantic.

A command names its stages and their defaults (`StageFlags`); `add_stage_flags` turns every field of every stage
model into a flag whose help is the field's description, the values it takes and its default. Flags keep the text
as typed; `stage_params` merges a `--config` file (YAML or JSON, `ppo: {beta: 0.05}`) under the flags and lets
each stage's pydantic model convert and check the result, so the CLI, the Prefect UI and the deployments accept
the same values. A value the model refuses becomes one `UsageError` naming the flag (or the file's key).
"""

from __future__ import annotations

import argparse
import difflib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from tasks.params import Params

Given = dict[str, dict[str, tuple[str, Any]]]  # stage -> field -> (where the value came from, the value)


class UsageError(Exception):
    """The command line or its config file asks for something invalid; the message says which flag and how to fix it."""


@dataclass(frozen=True)
class StageFlags:
    """The stages one command runs and how its flags map onto them."""

    defaults: Callable[[], dict[str, Params]]  # stage name -> its default parameters (called only when needed)
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # "pretrain.max_steps" -> ("--max-steps",)
    only: frozenset[str] | None = None  # expose just these "stage.field" keys (None: every field)
    notes: Mapping[str, str] = field(default_factory=dict)  # "stage.field" -> what its default is, when derived
    derive: Callable[[dict[str, Params], set[str]], dict[str, Params]] | None = None  # defaults that follow others


def add_stage_flags(parser: argparse.ArgumentParser, stages: dict[str, Params], flags: StageFlags) -> None:
    """`--config FILE` and one flag per stage field, grouped by stage in --help."""
    first_stage, first_field = _keys(stages, flags)[0].split(".")
    example = f"{first_stage}: {{{first_field}: {_shown(getattr(stages[first_stage], first_field))}}}"
    parser.add_argument("--config", metavar="FILE", help=f"YAML or JSON file of stage parameters by stage, "
                        f"e.g. `{example}` (the names of the flags); flags override it")
    for stage, defaults in stages.items():
        fields = {name: info for name, info in type(defaults).model_fields.items() if _exposed(flags, stage, name)}
        if not fields:
            continue
        group = parser.add_argument_group(f"{stage} stage ({type(defaults).__name__})")
        for name, info in fields.items():
            key = f"{stage}.{name}"
            options = [f"--{key}", *flags.aliases.get(key, ())]
            note = flags.notes.get(key) or f"default: {_shown(getattr(defaults, name))}"
            values = describe(info)
            values = "" if values in ("text", "true or false") else values  # the metavar or --no- says as much
            help_ = "; ".join(text for text in (info.description, values) if text) + f" [{note}]"
            kind, optional = _shape(info.annotation)
            if kind is bool and not optional:
                group.add_argument(*options, dest=key, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_.replace("%", "%%"))
            else:
                group.add_argument(*options, dest=key, action=_Typed, default=argparse.SUPPRESS,
                                   metavar=_metavar(kind, optional), help=help_.replace("%", "%%"))


def stage_params(stages: dict[str, Params], flags: StageFlags, args: argparse.Namespace) -> dict[str, Params]:
    """Each stage's parameters: its defaults, under the --config file's values, under the flags; validated."""
    given: Given = read_config(Path(args.config), stages, flags) if getattr(args, "config", None) else {}
    for stage, defaults in stages.items():
        for name, info in type(defaults).model_fields.items():
            typed = getattr(args, f"{stage}.{name}", None)
            if isinstance(typed, bool):  # --x.flag / --no-x.flag
                given.setdefault(stage, {})[name] = (f"--{stage}.{name}", typed)
            elif typed is not None:
                where = typed[-1][0]
                given.setdefault(stage, {})[name] = (where, _from_text(info, [text for _, text in typed], where))
    params = {stage: _validated(stage, defaults, given.get(stage, {})) for stage, defaults in stages.items()}
    keys = {f"{stage}.{name}" for stage, values in given.items() for name in values}
    return flags.derive(params, keys) if flags.derive else params


def read_config(path: Path, stages: dict[str, Params], flags: StageFlags) -> Given:
    """The file's values by stage and field, each named `stage.field in FILE`; unknown stages or keys are refused."""
    import yaml

    if not path.is_file():
        raise UsageError(f"--config: {path} does not exist; give a YAML or JSON file such as `ppo: {{beta: 0.05}}`")
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UsageError(f"--config: {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                         f"({' '.join(str(e).split())}); fix the file") from None
    data = {} if data is None else data  # an empty file
    if not isinstance(data, dict):
        raise UsageError(f"--config: {path} must map stage names to their parameters, e.g. `ppo: {{beta: 0.05}}`")
    given: Given = {}
    for stage, values in data.items():
        if stage not in stages:
            raise UsageError(f"{path}: unknown stage {stage!r}{_guess(str(stage), stages)}; this command's stages "
                             f"are {', '.join(stages)}")
        if not isinstance(values, dict):
            raise UsageError(f"{path}: {stage} must map parameter names to values, e.g. `{stage}: {{seed: 1}}`")
        fields = {n: f for n, f in type(stages[stage]).model_fields.items() if _exposed(flags, stage, n)}
        for name, value in values.items():
            if name not in fields:
                raise UsageError(f"{path}: unknown key {stage}.{name}{_guess(str(name), fields)}; "
                                 f"`--help` lists {stage}'s parameters")
            where = f"{stage}.{name} in {path}"
            if isinstance(value, str):  # a list as "0,1,4" or "none", as on the command line
                value = _from_text(fields[name], [value], where)
            given.setdefault(stage, {})[name] = (where, value)
    return given


_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("text", "texts"),
          bool: ("true or false", "true/false values")}


def describe(info: FieldInfo) -> str:
    """The values a field takes, e.g. `an integer >= 2 and <= 9` or `one of people, simulated, or none`."""
    kind, optional = _shape(info.annotation)
    if get_origin(kind) is Literal:
        text = "one of " + ", ".join(map(str, get_args(kind)))
    elif get_origin(kind) is list:
        item = get_args(kind)[0]
        text = f"a list of {_NAMES.get(item, ('', str(item)))[1]} (comma-separated, or JSON)"
    else:
        text = _NAMES.get(kind, (str(kind),))[0]
    bounds = [f"{sign} {getattr(m, attr)}" for m in info.metadata
              for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if hasattr(m, attr)]
    bounds += [f"of at least {m.min_length} characters" for m in info.metadata if hasattr(m, "min_length")]
    bounds += [f"matching {m.pattern}" for m in info.metadata if getattr(m, "pattern", None)]
    return text + (" " + " and ".join(bounds) if bounds else "") + (", or none" if optional else "")


class _Typed(argparse.Action):
    """Keeps each value as typed, with the flag that gave it; the stage's model converts and checks it later."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*getattr(namespace, self.dest, []), (option_string, values)])


def _validated(stage: str, defaults: Params, given: dict[str, tuple[str, Any]]) -> Params:
    model = type(defaults)
    try:
        return model.model_validate({**defaults.model_dump(), **{name: value for name, (_, value) in given.items()}})
    except ValidationError as e:
        error = e.errors()[0]
        name, *inner = error["loc"] or (stage,)
        where = given[name][0] if name in given else f"--{stage}.{name}"
        item = f"item {inner[0] + 1}: " if inner and isinstance(inner[0], int) else ""
        fix = (f"give {describe(model.model_fields[name])}; the default is {_shown(getattr(defaults, name))}"
               if name in model.model_fields else "see --help")
        raise UsageError(f"{where}: {item}{error['msg']} (got {error['input']!r}); {fix}") from None


def _from_text(info: FieldInfo, texts: list[str], where: str) -> Any:
    """A flag's text as the model's input: `none` is None, a list is split (each repeat adds to it), the rest is
    left for the model to convert."""
    kind, optional = _shape(info.annotation)
    if optional and texts[-1].strip().lower() in ("none", "null"):
        return None
    if get_origin(kind) is not list:
        return texts[-1]
    items = []
    for text in texts:
        if text.lstrip().startswith("["):
            try:
                items += json.loads(text)
            except (json.JSONDecodeError, TypeError) as e:
                raise UsageError(f"{where}: {text!r} is not a JSON list ({e}); give {describe(info)}") from None
        else:
            items += [part.strip() for part in text.split(",") if part.strip()]
    return items


def _shape(annotation: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed): `int | None` -> (int, True)."""
    if get_origin(annotation) in (Union, UnionType):
        rest = [a for a in get_args(annotation) if a is not NoneType]
        return (rest[0] if len(rest) == 1 else Union[tuple(rest)]), len(rest) < len(get_args(annotation))
    return annotation, False


def _metavar(kind: Any, optional: bool) -> str:
    if get_origin(kind) is Literal:
        return "{" + ",".join(map(str, get_args(kind) + (("none",) if optional else ()))) + "}"
    if kind is bool:
        return "{true,false,none}"
    return {int: "INT", float: "NUM", str: "TEXT"}.get(kind, "LIST")


def _shown(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value)) or "[]"
    return str(value)


def _keys(stages: dict[str, Params], flags: StageFlags) -> list[str]:
    """Every "stage.field" a command exposes."""
    return [f"{stage}.{name}" for stage, defaults in stages.items() for name in type(defaults).model_fields
            if _exposed(flags, stage, name)]


def _exposed(flags: StageFlags, stage: str, name: str) -> bool:
    return flags.only is None or f"{stage}.{name}" in flags.only


def _guess(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""
