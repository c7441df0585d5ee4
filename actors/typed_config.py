"""``typed_config``: frozen dataclasses whose fields are validated and coerced by type, with short errors.

Knows: the decorator every user-facing config uses (``RunConfig``, ``PromptConfig``,
``LoraTrainConfig``, ``TableConfig``, ``ServeConfig``): a pydantic dataclass, frozen, unknown keys
refused, defaults checked, values coerced by the field's type (``"1e-5"`` -> ``1e-05`` for a
``float``, ``"3"`` -> ``3`` for an ``int``, a list -> a ``tuple``, a mapping -> a nested config), then
the class's ``__post_init__`` checks. To the rest of the code base they stay plain frozen dataclasses
(``dataclasses.fields/asdict/replace``, ``vars``, equality, hashing, pickling); ``replace`` validates
again. Errors are a ``ValueError`` with one line per bad key,
``key: message (got VALUE)``, nested keys dotted (``lora.lr``), unknown keys named with the valid
ones; ``from_mapping`` builds a config from a YAML/args mapping and puts where it came from in front
of each line. Does not know any particular config, YAML files or flags.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, TypeVar, dataclass_transform

from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass

T = TypeVar("T")

_SETTINGS = ConfigDict(extra="forbid", validate_default=True)
_UNKNOWN = ("unexpected_keyword_argument", "extra_forbidden")


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def typed_config(cls: type[T]) -> type[T]:
    """A frozen dataclass validated by its field types (a pydantic dataclass).

    Its constructor (and so ``dataclasses.replace``) raises ``ValueError``, one line per bad key.
    """
    cls = _pydantic_dataclass(frozen=True, config=_SETTINGS)(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as exc:
            raise ValueError("\n".join(describe(exc, type(self)))) from None

    cls.__init__ = __init__
    return cls


def from_mapping(cls: type[T], data: Any, where: str) -> T:
    """``cls`` from a mapping (a YAML document, builder args); every error line starts with ``where: ``.

    Raises:
        ValueError: not a mapping, unknown keys (named, with the valid ones), or bad values; one line each.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {_show(data)}")
    try:
        return cls.__pydantic_validator__.validate_python(dict(data))  # type: ignore[attr-defined]
    except ValidationError as exc:
        raise ValueError("\n".join(f"{where}: {line}" for line in describe(exc, cls))) from None


def field_type(cls: type, name: str) -> Any:
    """The resolved annotation of a typed config's field (``dataclasses.Field.type`` may be a string)."""
    return cls.__pydantic_fields__[name].annotation  # type: ignore[attr-defined]


def describe(exc: ValidationError, cls: type) -> list[str]:
    """Pydantic's errors as short lines: ``key: message (got VALUE)``; unknown keys grouped per section."""
    lines: list[str] = []
    unknown: dict[tuple, list[str]] = {}
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        if err["type"] in _UNKNOWN:
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
            continue
        if err["type"] in ("value_error", "assertion_error") and "error" in err.get("ctx", {}):
            message = str(err["ctx"]["error"])  # a __post_init__ check: its own words
        elif err["type"] in ("missing", "missing_argument", "missing_keyword_only_argument"):
            message = "required, not given"
        else:
            message = err["msg"].split(", unable to ")[0]
            message = f"{message[:1].lower()}{message[1:]} (got {_show(err['input'])})"
        key = _key(loc)
        lines.append(f"{key}: {message}" if key else message)
    for parent, names in unknown.items():
        section = _section(cls, parent)
        valid = f"; valid keys: {sorted(f.name for f in dataclasses.fields(section))}" if section else ""
        key = _key(parent)
        lines.insert(0, f"{key + ': ' if key else ''}unknown keys {sorted(names)}{valid}")
    return lines or [str(exc)]


def _key(loc: tuple) -> str:
    """``('lora', 'target_modules', 0)`` -> ``lora.target_modules[0]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _section(cls: type, loc: tuple) -> type | None:
    """The nested config class at ``loc`` (``('lora',)`` -> ``LoraTrainConfig``), or None."""
    for part in loc:
        fields = getattr(cls, "__pydantic_fields__", {})
        if part not in fields:
            return None
        cls = fields[part].annotation
    return cls if dataclasses.is_dataclass(cls) else None


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
