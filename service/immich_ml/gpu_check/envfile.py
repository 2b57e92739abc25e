"""systemd's `EnvironmentFile=` format, read as systemd reads it, so the checks see what the service gets.

`KEY=VALUE` assignments; blank lines and lines starting with `#` or `;` are comments; whitespace around the
key and before the value is dropped; single-quoted text is literal, double-quoted text takes `\\"`, `\\\\`, `\\$`
and `` \\` `` escapes, and both may span lines; unquoted text loses its trailing whitespace and its backslashes
escape the next character; a backslash before a newline continues the line (systemd.exec(5), "EnvironmentFile=",
and systemd's `parse_env_file`, whose states this follows).
"""

from __future__ import annotations

import re

__all__ = ["parse_environment_file"]

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOUBLE_QUOTED_ESCAPES = '"\\$`'


def parse_environment_file(text: str) -> dict[str, str]:
    """The variables `text` (a whole file) assigns, in systemd's order; invalid names are skipped, as systemd
    skips them."""
    variables: dict[str, str] = {}
    state, key, value = "pre_key", "", ""
    trailing = -1  # where an unquoted value's trailing whitespace starts (-1: none)

    def assign() -> None:
        name = key.strip()
        if _KEY.fullmatch(name):
            variables[name] = value[:trailing] if trailing >= 0 else value

    for char in text:
        newline = char in "\n\r"
        if state == "pre_key":
            if char in "#;":
                state = "comment"
            elif not char.isspace():
                state, key = "key", char
        elif state == "key":
            if newline:
                state = "pre_key"
            elif char == "=":
                state, value, trailing = "pre_value", "", -1
            else:
                key += char
        elif state == "comment":
            state = {"\\": "comment_escape", "\n": "pre_key", "\r": "pre_key"}.get(char, "comment")
        elif state == "comment_escape":
            state = "comment"
        elif state in ("pre_value", "value") and newline:
            assign()
            state = "pre_key"
        elif state == "pre_value" and char in "'\"":
            state = "single" if char == "'" else "double"
        elif state in ("pre_value", "value") and char == "\\":
            state, trailing = "escape", -1
        elif state == "pre_value" and char.isspace():
            continue
        elif state in ("pre_value", "value"):
            if not char.isspace():
                trailing = -1
            elif trailing < 0:
                trailing = len(value)
            state, value = "value", value + char
        elif state == "escape":
            state, value = "value", value if newline else value + char
        elif state == "single":
            state, value = ("pre_value", value) if char == "'" else ("single", value + char)
        elif state == "double":
            if char == '"':
                state = "pre_value"
            elif char == "\\":
                state = "double_escape"
            else:
                value += char
        else:  # double_escape
            state = "double"
            if char in _DOUBLE_QUOTED_ESCAPES:
                value += char
            elif char != "\n":
                value += "\\" + char
    if state not in ("pre_key", "key", "comment", "comment_escape"):
        assign()
    return variables
