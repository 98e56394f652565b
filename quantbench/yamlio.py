"""The YAML files quantbench reads (recipes, allocations): `safe_load` that refuses a repeated key, and
errors that name the file, the line and the column."""

from __future__ import annotations

from pathlib import Path

import yaml

from quantbench.errors import QuantbenchError


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader for which a key given twice in one mapping is an error, not a silent overwrite."""

    def construct_mapping(self, node, deep=False):
        self.flatten_mapping(node)
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice; keep one",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path, what: str):
    """Parse a YAML file; a missing file, bad syntax, a repeated key or non-UTF-8 bytes are one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise QuantbenchError(f"{what} {path} not found; give the path of an existing YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QuantbenchError(f"{path}: not UTF-8 text; a {what} is a YAML file") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise QuantbenchError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None


def read_allocation_layers(path: str | Path) -> dict[str, str]:
    """Layer → scheme name from an allocation YAML written by `quantbench allocate` (or by hand: only
    `layers` is read)."""
    data = load_yaml(path, "allocation file")
    if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
        raise QuantbenchError(f"{path}: an allocation file maps `layers:` to {{layer name: scheme name}}")
    return {str(k): str(v) for k, v in data["layers"].items()}
