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


def split_top(text: str, sep: str) -> list[str]:
    """Split ``text`` at ``sep`` outside parentheses: ``"a(b,c),d"`` -> ``["a(b,c)", "d"]``.

    Raises ValueError on unbalanced parentheses."""
    parts, depth, current = [], 0, []
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if depth < 0:
            raise ValueError(f"unbalanced ')' in {text!r}")
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise ValueError(f"unbalanced '(' in {text!r}")
    return [*parts, "".join(current)]


def name_and_args(spec: str) -> tuple[str, str]:
    """``"name:args"`` or ``"name(args)"`` -> ``("name", "args")``."""
    text = spec.strip()
    paren, colon = text.find("("), text.find(":")
    if paren != -1 and (colon == -1 or paren < colon):
        if not text.endswith(")"):
            raise ValueError(f"cannot read {spec!r}: text after the closing parenthesis")
        return text[:paren].strip(), text[paren + 1 : -1]
    name, _, rest = text.partition(":")
    return name.strip(), rest


def split_spec(spec: str) -> tuple[str, list, dict]:
    """``"name:a,k=v"`` or ``"name(a,k=v)"`` -> ``("name", [a], {"k": v})`` with values parsed by
    :func:`parse_value`; commas inside parentheses stay with their value."""
    name, rest = name_and_args(spec)
    positional, keywords = [], {}
    for part in (p for p in split_top(rest, ",") if p.strip()) if rest.strip() else ():
        key, eq, value = part.partition("=")
        if eq and "(" not in key:
            keywords[key.strip()] = parse_value(value.strip())
        else:
            positional.append(parse_value(part.strip()))
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
