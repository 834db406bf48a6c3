"""Pass options: each option declares its default, its doc and its search space in one place.

Search reads the spaces back with :func:`search_spaces`, so a pass author never describes an
option twice. An option is a pydantic field built by :func:`option`::

    class Options(PassOptions):
        sparsity: float = option(0.5, "Fraction of weights set to zero.",
                                 FloatRange(0.1, 0.95), ge=0.0, lt=1.0)
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class FloatRange(BaseModel):
    kind: Literal["float"] = "float"
    low: float
    high: float
    log: bool = False
    step: float | None = None

    def __init__(self, low: float, high: float, **kw: Any) -> None:
        super().__init__(low=low, high=high, **kw)


class IntRange(BaseModel):
    kind: Literal["int"] = "int"
    low: int
    high: int
    log: bool = False
    step: int = 1

    def __init__(self, low: int, high: int, **kw: Any) -> None:
        super().__init__(low=low, high=high, **kw)


class Choice(BaseModel):
    kind: Literal["choice"] = "choice"
    values: list[Any]

    def __init__(self, values: list[Any], **kw: Any) -> None:
        super().__init__(values=list(values), **kw)


SearchSpace = Annotated[FloatRange | IntRange | Choice, Field(discriminator="kind")]
_SPACE_ADAPTER: TypeAdapter = TypeAdapter(SearchSpace)
_SPACE_KEY = "search_space"


def option(
    default: Any, doc: str, space: FloatRange | IntRange | Choice | None = None, **kw: Any
) -> Any:
    """A pydantic field carrying ``doc`` and, if searchable, its ``space``."""
    extra = {_SPACE_KEY: space.model_dump()} if space is not None else None
    if isinstance(default, (list, dict, set)):
        return Field(
            default_factory=lambda: type(default)(default),
            description=doc,
            json_schema_extra=extra,
            **kw,
        )
    return Field(default, description=doc, json_schema_extra=extra, **kw)


class PassOptions(BaseModel):
    """Base for option schemas: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class NoOptions(PassOptions):
    pass


class LayerPassOptions(PassOptions):
    """Options of passes that act per layer: any option may differ for chosen layers."""

    overrides: dict[str, dict[str, Any]] = option(
        {},
        "Per-layer option values: layer id (or regex over ids) -> {option: value}. This is "
        "how one pipeline gives each layer its own bit width or sparsity (mixed precision).",
    )


def search_spaces(options: type[PassOptions]) -> dict[str, FloatRange | IntRange | Choice]:
    """The declared search space of every searchable option."""
    spaces = {}
    for name, info in options.model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and _SPACE_KEY in extra:
            spaces[name] = _SPACE_ADAPTER.validate_python(extra[_SPACE_KEY])
    return spaces


def describe_options(options: type[PassOptions]) -> list[dict[str, Any]]:
    """Name, type, default, doc and search space of each option, for ``graphsurgeon passes``."""
    spaces = search_spaces(options)
    rows = []
    for name, info in options.model_fields.items():
        default = info.get_default(call_default_factory=True)
        rows.append(
            {
                "name": name,
                "type": _type_name(info.annotation),
                "default": default,
                "doc": info.description or "",
                "search_space": spaces[name].model_dump() if name in spaces else None,
            }
        )
    return rows


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "")
