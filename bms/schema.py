"""Strict schemas for the TOML files pybms reads: configs, limit sets, cell parameter sets.

One home for what they share: immutable models that refuse unknown keys, paths resolved
against the file that names them, and errors turned into one line each that names the file,
the section and the option, with the nearest valid name as a suggestion.
"""

from __future__ import annotations

import difflib
import tomllib
import types
import typing
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, ValidationInfo


class SchemaError(Exception):
    """A file that cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def _resolve_existing_path(value: Path, info: ValidationInfo) -> Path:
    base_dir = (info.context or {}).get("base_dir", Path.cwd())
    path = value if value.is_absolute() else (base_dir / value)
    if not path.exists():
        raise ValueError(f"no such file or directory: {path}")
    return path.resolve()


ExistingPath = Annotated[Path, AfterValidator(_resolve_existing_path)]
"""A path relative to the config file's directory that must exist."""


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base_dir = (info.context or {}).get("base_dir", Path.cwd())
    return (value if value.is_absolute() else base_dir / value).resolve()


RelativePath = Annotated[Path, AfterValidator(_resolve_path)]
"""A path relative to the config file's directory, for a file the program creates."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; raise SchemaError naming the file on any failure."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SchemaError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SchemaError([f"{path}: not valid TOML: {exc}"]) from None


Model = typing.TypeVar("Model", bound=BaseModel)


def load_model(path: Path, model: type[Model], context: dict[str, Any] | None = None) -> Model:
    """Read ``path`` and validate it as ``model``; raise SchemaError listing every problem."""
    raw = read_toml(path)
    try:
        return model.model_validate(raw, context=context)
    except ValidationError as exc:
        raise SchemaError(describe_errors(path, model, exc, ())) from None


def describe_errors(
    path: Path, model: type[BaseModel], exc: ValidationError, prefix: tuple[str, ...]
) -> list[str]:
    """Turn pydantic's errors into one line each: file, section, option, what is wrong."""
    lines = []
    for error in exc.errors(include_url=False):
        loc = tuple(str(part) for part in error["loc"])
        kind = error["type"]
        if kind == "extra_forbidden":
            names = _field_names_at(model, loc[:-1])
            message = "unknown option" + suggest(loc[-1], names)
        elif kind == "missing":
            is_section = len(loc) == 1 and _is_section(model, loc[0])
            message = f"required {'section' if is_section else 'option'} is missing"
        else:
            message = error["msg"].removeprefix("Value error, ")
            if "input" in error and not isinstance(error["input"], dict):
                message += f" (got {error['input']!r})"
        where = _where(model, prefix, loc)
        lines.append(f"{path}: {where}: {message}" if where else f"{path}: {message}")
    return lines


def _where(model: type[BaseModel], prefix: tuple[str, ...], loc: tuple[str, ...]) -> str:
    """``[section] option``, ``[section]`` for a whole section, a top-level option name, or
    nothing for a check across the whole file (its message names the options)."""
    full = prefix + loc
    if not full:
        return ""
    if len(full) == 1:
        return f"[{full[0]}]" if _is_section(model, full[0]) else full[0]
    section = ".".join(part for part in full[:-1] if not part.isdigit())
    return f"[{section}] {full[-1]}"


def _is_section(model: type[BaseModel], name: str) -> bool:
    field = model.model_fields.get(name)
    if field is None:
        return False
    return _model_in(field.annotation) is not None or typing.get_origin(field.annotation) is dict


def suggest(name: str, candidates: list[str]) -> str:
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def _field_names_at(model: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    """The option names valid at ``loc`` inside ``model``, for near-match suggestions."""
    current: Any = model
    for part in loc:
        if part.isdigit():
            continue
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            return []
        current = _model_in(fields[part].annotation)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
