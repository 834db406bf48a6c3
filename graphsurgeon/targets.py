"""Target selectors: which nodes a pass may touch.

Names are matched exactly or as a full regular expression; layer ids come from
:mod:`graphsurgeon.layers`. An empty selector selects every node. Exclusions win.
"""

from __future__ import annotations

import re
from functools import cached_property

import onnx_ir as ir
from pydantic import BaseModel, ConfigDict, Field, field_validator

from graphsurgeon.layers import layer_id


class Targets(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    names: list[str] = Field(
        default_factory=list, description="Node names or regexes (full match)."
    )
    op_types: list[str] = Field(default_factory=list, description="Op types, e.g. Conv, MatMul.")
    layers: list[str] = Field(
        default_factory=list, description="Layer ids or regexes (full match)."
    )
    exclude: list[str] = Field(
        default_factory=list, description="Node names or layer ids (or regexes) never touched."
    )

    @field_validator("names", "layers", "exclude")
    @classmethod
    def _valid_regex(cls, values: list[str]) -> list[str]:
        for v in values:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"invalid regex {v!r}: {e}") from None
        return values

    @property
    def empty(self) -> bool:
        return not (self.names or self.op_types or self.layers or self.exclude)

    @cached_property
    def _compiled(self) -> tuple[list[re.Pattern], list[re.Pattern], list[re.Pattern]]:
        return (
            [re.compile(p) for p in self.names],
            [re.compile(p) for p in self.layers],
            [re.compile(p) for p in self.exclude],
        )

    def selects(self, node: ir.Node) -> bool:
        names, layers, exclude = self._compiled
        name = node.name or ""
        lid = layer_id(node) or ""
        if any(_hit(p, name) or (lid and _hit(p, lid)) for p in exclude):
            return False
        if not (self.names or self.op_types or self.layers):
            return True
        return (
            (bool(self.op_types) and node.op_type in self.op_types)
            or any(_hit(p, name) for p in names)
            or (bool(lid) and any(_hit(p, lid) for p in layers))
        )


def _hit(pattern: re.Pattern, text: str) -> bool:
    return pattern.pattern == text or pattern.fullmatch(text) is not None


ALL = Targets()
