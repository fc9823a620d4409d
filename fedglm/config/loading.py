"""YAML files into config objects, and every problem into one line.

`load_config` turns any problem (missing file, YAML syntax, an alias, a file over 1 MiB,
unknown key, wrong type, impossible value) into one `InputError` line naming the file, the
key, the value and what is expected. Relative paths in a file are resolved against that file's
folder, so a config means the same from any directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from fedglm.errors import InputError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


MAX_CONFIG_BYTES = 1 << 20  # a real config is a few kilobytes


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: a few hundred bytes of nested aliases expand to
    billions of nodes (a "billion laughs"), and no fedglm config needs them."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            message = "aliases (*name) are not allowed in fedglm configs; write the value out"
            raise yaml.composer.ComposerError(None, None, message, mark)
        return super().compose_node(parent, index)


def load_config(path: Path, cls: type[ConfigT]) -> ConfigT:
    """Read a YAML file into `cls`, or raise one `InputError` line saying what to fix."""
    if not path.is_file():
        raise InputError(f"config file {path} does not exist (or is not a file)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise InputError(f"config file {path} is {path.stat().st_size:,} bytes; a config is at most 1 MiB")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_NoAliasLoader)  # a SafeLoader
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid UTF-8 at byte {exc.start}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return validate_config(data, cls, source=str(path), base_dir=path.parent)


def validate_config(
    data: dict[str, Any], cls: type[ConfigT], *, source: str, base_dir: Path | None = None
) -> ConfigT:
    """Validate a mapping into `cls`; errors become one `InputError` line."""
    try:
        return cls.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise InputError(f"{source}: {describe_validation_error(exc, cls)}") from None


def describe_validation_error(exc: ValidationError, cls: type[BaseModel]) -> str:
    """The first problem in `exc` as 'key = value: what is expected' (plus a count of others)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = [part for part in first["loc"] if not isinstance(part, str) or part]
    key = ".".join(str(part) for part in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(cls, loc[:-1])
        message = f"unknown key '{key}'" + (f"; allowed here: {', '.join(allowed)}" if allowed else "")
    elif first["type"] == "missing":
        message = f"missing required key '{key}'"
    else:
        reason = first["msg"].removeprefix("Value error, ")
        value = first.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        message = f"{key}{shown}: {reason}"
    more = len(errors) - 1
    return message + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def _allowed_keys(cls: type[BaseModel], loc: list[Any]) -> list[str]:
    current: Any = cls
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _model_in(field.annotation)
        if current is None:
            return []
    return sorted(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
