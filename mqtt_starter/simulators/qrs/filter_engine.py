"""The QRS `?filter=` language: a tokenizer, a recursive-descent parser and an evaluator.

Grammar (`and` binds tighter than `or`; keywords and operators are case-insensitive):
    expr    := conj ("or" conj)*
    conj    := primary ("and" primary)*
    primary := "(" expr ")" | path OP value
    value   := 'quoted' (\\' is a quote, \\\\ a backslash) | GUID | number | true | false | null
A path through a list matches when ANY element matches; string comparison ignores case.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# Reads a date literal of a filter as the moment the server takes it for.
DateReader = Callable[[str], datetime | None]
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})?$")


class FilterError(ValueError):
    """A filter QRS would refuse; `message` is the exact text of its 400 answer."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


@dataclass(frozen=True)
class Comparison:
    """`property op value` in a QRS filter."""

    path: tuple[str, ...]
    op: str
    value: Any


@dataclass(frozen=True)
class BoolOp:
    """`left and|or right` in a QRS filter."""

    op: str  # "and" | "or"
    left: Node
    right: Node


Node = Comparison | BoolOp

_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_NUMBER = re.compile(r"-?\d+(\.\d+)?")
_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_OPERATORS = {"eq", "ne", "gt", "ge", "lt", "le", "sw", "ew", "so"}
_STRING_ONLY = {"sw", "ew", "so"}
_ESCAPES = {"'": "'", "\\": "\\"}


@dataclass(frozen=True)
class _Token:
    kind: str  # "(" ")" "word" "string"
    text: str


class _Unparsable(Exception):
    pass


def _tokens(text: str) -> Iterator[_Token]:
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in "()":
            yield _Token(ch, ch)
            i += 1
        elif ch == "'":
            chars = []
            i += 1
            while True:
                if i >= len(text):
                    raise _Unparsable
                ch = text[i]
                if ch == "\\":
                    if i + 1 >= len(text) or text[i + 1] not in _ESCAPES:
                        raise _Unparsable
                    chars.append(_ESCAPES[text[i + 1]])
                    i += 2
                elif ch == "'":
                    i += 1
                    break
                else:
                    chars.append(ch)
                    i += 1
            # A string must be followed by a separator; `'a''b'` (doubled quote) is refused.
            if i < len(text) and not (text[i].isspace() or text[i] == ")"):
                raise _Unparsable
            yield _Token("string", "".join(chars))
        else:
            start = i
            while i < len(text) and not text[i].isspace() and text[i] not in "()'":
                i += 1
            yield _Token("word", text[start:i])


class _Parser:
    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> _Token:
        token = self.peek()
        if token is None:
            raise _Unparsable
        self.pos += 1
        return token

    def keyword(self, word: str) -> bool:
        token = self.peek()
        if token is not None and token.kind == "word" and token.text.lower() == word:
            self.pos += 1
            return True
        return False

    def expr(self) -> Node:
        node = self.conj()
        while self.keyword("or"):
            node = BoolOp("or", node, self.conj())
        return node

    def conj(self) -> Node:
        node = self.primary()
        while self.keyword("and"):
            node = BoolOp("and", node, self.primary())
        return node

    def primary(self) -> Node:
        token = self.take()
        if token.kind == "(":
            nxt = self.peek()
            if nxt is not None and nxt.kind == ")":
                raise FilterError("Invalid expression")
            node = self.expr()
            if self.take().kind != ")":
                raise _Unparsable
            return node
        if token.kind != "word" or not _PATH.fullmatch(token.text):
            raise _Unparsable
        op = self.take()
        if op.kind != "word" or op.text.lower() not in _OPERATORS:
            raise _Unparsable
        return Comparison(
            tuple(p.lower() for p in token.text.split(".")),
            op.text.lower(),
            self.value(),
        )

    def value(self) -> Any:
        token = self.take()
        if token.kind == "string":
            return token.text
        if token.kind != "word":
            raise _Unparsable
        text = token.text
        if _GUID.fullmatch(text):
            return text.lower()
        if _NUMBER.fullmatch(text):
            return float(text) if "." in text else int(text)
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered == "null":
            return None
        raise _Unparsable


def parse(text: str) -> Node:
    """The syntax tree of a filter, or FilterError with the text QRS answers."""
    try:
        parser = _Parser(list(_tokens(text)))
        node = parser.expr()
        if parser.peek() is not None:
            raise _Unparsable
        return node
    except (_Unparsable, RecursionError):
        raise FilterError(f"Cannot parse the expression: {text}") from None


def _leaves(obj: Any, path: tuple[str, ...]) -> Iterator[Any]:
    """Every value at `path`, case-insensitively, fanning out over lists (ANY semantics)."""
    if isinstance(obj, list):
        for item in obj:
            yield from _leaves(item, path)
        return
    if not path:
        yield obj
        return
    if isinstance(obj, Mapping):
        for key, child in obj.items():
            if key.lower() == path[0]:
                yield from _leaves(child, path[1:])


def _date(text: str) -> datetime | None:
    if not _DATE.match(text):
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _ordered(left: Any, right: Any, read_date: DateReader | None = None) -> tuple[Any, Any] | None:
    if isinstance(left, bool) or isinstance(right, bool):
        return None
    if isinstance(left, int | float) and isinstance(right, int | float):
        return left, right
    if isinstance(left, str) and isinstance(right, str):
        # DateTime fields compare as moments (with or without milliseconds); the literal is
        # read as the server reads it.
        stored = _date(left)
        wanted = (read_date or _date)(right) if stored is not None else None
        if stored is not None and wanted is not None:
            return stored, wanted
        return left.lower(), right.lower()
    return None


def _equal(actual: Any, wanted: Any) -> bool:
    if isinstance(actual, str) and isinstance(wanted, str):
        return actual.casefold() == wanted.casefold()
    if isinstance(actual, bool) or isinstance(wanted, bool):
        return actual is wanted
    return bool(actual == wanted)


def _compare(op: str, actual: Any, wanted: Any, read_date: DateReader | None = None) -> bool:
    if op in _STRING_ONLY:
        if not isinstance(actual, str) or not isinstance(wanted, str):
            return False
        a, w = actual.casefold(), wanted.casefold()
        return a.startswith(w) if op == "sw" else a.endswith(w) if op == "ew" else w in a
    if op in ("eq", "ne"):
        same = _equal(actual, wanted)
        return same if op == "eq" else not same
    pair = _ordered(actual, wanted, read_date)
    if pair is None:
        return False
    a, w = pair
    checks: dict[str, Callable[[Any, Any], bool]] = {
        "gt": lambda x, y: x > y,
        "ge": lambda x, y: x >= y,
        "lt": lambda x, y: x < y,
        "le": lambda x, y: x <= y,
    }
    return checks[op](a, w)


def evaluate(node: Node, obj: Mapping[str, Any], read_date: DateReader | None = None) -> bool:
    """Whether `obj` matches; `read_date` reads a date literal as the server does (default:
    as UTC)."""
    if isinstance(node, BoolOp):
        if node.op == "and":
            return evaluate(node.left, obj, read_date) and evaluate(node.right, obj, read_date)
        return evaluate(node.left, obj, read_date) or evaluate(node.right, obj, read_date)
    return any(_compare(node.op, leaf, node.value, read_date) for leaf in _leaves(obj, node.path))
