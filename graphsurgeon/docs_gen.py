"""Reference docs generated from the code, so they cannot drift from it.

``python -m graphsurgeon.docs_gen docs/`` writes:

- ``docs/passes.md``: the pass catalogue, from the registry (kind, what each pass handles,
  options with defaults and search spaces);
- ``docs/profile-schema.md``: the hardware-profile schema, from the pydantic models.

``tests/test_docs.py`` fails when the committed files differ from what the code generates.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

from graphsurgeon.options import describe_options
from graphsurgeon.registry import all_passes

__all__ = ["pass_catalogue", "profile_schema", "write_docs"]


def _space(space: dict[str, Any] | None) -> str:
    if not space:
        return ""
    if space.get("kind") == "choice":
        return "one of " + ", ".join(f"`{v}`" for v in space.get("values", []))
    low, high = space.get("low"), space.get("high")
    log = " (log scale)" if space.get("log") else ""
    step = f", step {space['step']}" if space.get("step") else ""
    return f"[{low}, {high}]{step}{log}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def pass_catalogue() -> str:
    passes = all_passes()
    kinds = {"exact": "exact", "lossy": "lossy", "surgery": "surgery"}
    out = [
        "# Pass catalogue",
        "",
        "Generated from the registry by `python -m graphsurgeon.docs_gen docs/`; do not edit.",
        "`graphsurgeon passes` prints the same live, including passes other packages register.",
        "",
        "Kinds: **exact** passes keep the outputs (checked numerically with `--verify numeric`),",
        "**lossy** passes trade accuracy for size or speed (drift reported), **surgery** passes",
        "change the architecture or train.",
        "",
        "| pass | kind | targets | summary |",
        "| --- | --- | --- | --- |",
    ]
    for name, cls in passes.items():
        summary = (cls.__doc__ or "").strip().split("\n")[0]
        targets = "yes" if cls.supports_targets else "no"
        out.append(f"| [`{name}`](#{name}) | {kinds[cls.kind]} | {targets} | {_cell(summary)} |")
    for name, cls in passes.items():
        out += ["", f"## {name}", "", f"*{cls.kind}*, `{cls.__module__}.{cls.__qualname__}`", ""]
        doc = inspect.cleandoc(cls.__doc__ or "").strip()
        if doc:
            out += [doc, ""]
        options = describe_options(cls.Options)
        if options:
            out += [
                "| option | type | default | search space | meaning |",
                "| --- | --- | --- | --- | --- |",
            ]
            for o in options:
                default = json.dumps(o["default"], default=str)
                out.append(
                    f"| `{o['name']}` | {_cell(o['type'])} | `{_cell(default)}` | "
                    f"{_space(o['search_space'])} | {_cell(o['doc'])} |"
                )
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def profile_schema() -> str:
    from graphsurgeon.profiles import HardwareProfile

    schema = HardwareProfile.model_json_schema()
    out = [
        "# Hardware-profile schema",
        "",
        "Generated from `graphsurgeon.profiles.HardwareProfile` by",
        "`python -m graphsurgeon.docs_gen docs/`; do not edit. Profiles are YAML files",
        "(`hardware_profiles/*.yaml`); unknown keys are errors, and every error names its field.",
        "`graphsurgeon profile show NAME` prints a shipped one, `graphsurgeon profile detect -o",
        "FILE.yaml` measures this machine.",
        "",
    ]
    defs = schema.get("$defs", {})

    def table(title: str, node: dict[str, Any]) -> None:
        required = set(node.get("required", []))
        out.extend([f"## {title}", ""])
        if node.get("description"):
            out.extend([node["description"], ""])
        out.extend(
            ["| field | type | required | default | meaning |", "| --- | --- | --- | --- | --- |"]
        )
        for field, spec in node.get("properties", {}).items():
            out.append(
                f"| `{field}` | {_cell(_type(spec))} | {'yes' if field in required else 'no'} | "
                f"{_cell(json.dumps(spec['default'])) if 'default' in spec else ''} | "
                f"{_cell(spec.get('description', ''))} |"
            )
        out.append("")

    table("HardwareProfile (the file)", schema)
    for name in sorted(defs):
        table(name, defs[name])
    return "\n".join(out).rstrip() + "\n"


def _type(spec: dict[str, Any]) -> str:
    if "$ref" in spec:
        return spec["$ref"].rsplit("/", 1)[-1]
    if "enum" in spec:
        return " | ".join(json.dumps(v) for v in spec["enum"])
    if "const" in spec:
        return json.dumps(spec["const"])
    if "anyOf" in spec:
        return " or ".join(_type(s) for s in spec["anyOf"])
    kind = spec.get("type", "any")
    if kind == "array":
        return f"list of {_type(spec.get('items', {}))}"
    if kind == "object" and "additionalProperties" in spec:
        extra = spec["additionalProperties"]
        keys = spec.get("propertyNames", {})
        key = _type(keys) if keys else "string"
        return f"map {key} -> {_type(extra) if isinstance(extra, dict) else 'any'}"
    bounds = [
        f"{op} {spec[k]}"
        for k, op in (("exclusiveMinimum", ">"), ("minimum", ">="), ("maximum", "<="))
        if k in spec
    ]
    return kind + (f" ({', '.join(bounds)})" if bounds else "")


def write_docs(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("passes.md", pass_catalogue()), ("profile-schema.md", profile_schema())):
        path = folder / name
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_docs(sys.argv[1] if len(sys.argv) > 1 else "docs"):
        print(f"wrote {path}")
