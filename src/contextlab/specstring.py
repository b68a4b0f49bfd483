"""Parsing of ``name:arg,key=value`` spec strings (methods, tasks)."""

from __future__ import annotations


def parse_value(text: str):
    """``true``/``false`` -> bool, integers and floats -> numbers, anything else stays text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def split_spec(spec: str) -> tuple[str, list, dict]:
    """``"name:a,k=v"`` -> ``("name", [a], {"k": v})`` with values parsed by :func:`parse_value`."""
    name, _, rest = spec.strip().partition(":")
    positional, keywords = [], {}
    for part in (p for p in rest.split(",") if p.strip()) if rest.strip() else ():
        key, eq, value = part.partition("=")
        if eq:
            keywords[key.strip()] = parse_value(value.strip())
        else:
            positional.append(parse_value(key.strip()))
    return name.strip(), positional, keywords


def parse_length(text: str) -> int:
    """``"4k"`` -> 4096, ``"1500"`` -> 1500."""
    raw = text.strip().lower()
    try:
        value = int(float(raw[:-1]) * 1024) if raw.endswith("k") else int(raw)
    except ValueError:
        raise ValueError(f"cannot read length {text!r}: use tokens like 4096 or 4k") from None
    if value < 1:
        raise ValueError(f"length must be positive, got {text!r}")
    return value
