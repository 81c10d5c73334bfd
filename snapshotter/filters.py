"""containerd's filter syntax, as containerd 1.6 applies it to snapshot List/Walk.

A filter string is a comma-separated conjunction of selectors; a list of filter strings is a
disjunction, and an empty list (or an empty string) matches everything:

    selectors := selector ("," selector)*
    selector  := fieldpath [operator value]
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="
    value     := quoted | <graphic characters other than ",", without white space>
    quoted    := Go string syntax in double quotes; for "~=" also /.../ or |...|

The scanner and parser follow containerd's `filters` package, so the same strings are accepted
or rejected (checked by differential fuzzing against containerd 1.6.20's Go code), and the error
messages read the same. Where this module differs:

* a `~=` value that is not a valid regular expression is rejected when parsing (containerd
  accepts it and the selector then matches nothing);
* regular expressions use Python's `re` (with re.ASCII, as RE2's classes are ASCII), not RE2:
  RE2-only syntax such as `\\pL`, `\\z` or `[[:alpha:]]` is rejected, Python-only syntax such
  as look-arounds is accepted, `$` also matches before a final newline, `(?i)` folds only
  ASCII, and `re` may backtrack where RE2 would not;
* error positions count characters, not UTF-8 bytes, and long inputs are shortened in messages.
"""

import dataclasses
import enum
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence

# An adaptor: a field path to (value, present), as containerd's filters.Adaptor.
FieldLookup = Callable[[list[str]], tuple[str, bool]]


class FilterError(ValueError):
    """A filter string that does not parse; the service maps it to INVALID_ARGUMENT."""

    def __init__(self, text: str, position: int, reason: str) -> None:
        self.text = text
        self.position = position  # index of the offending character; len(text) at the end
        self.reason = reason
        super().__init__(f"filters: parse error: {_point_at(text, position)}: {reason}")


def _point_at(text: str, position: int) -> str:
    """containerd's way of showing where in the input the error is."""
    if position < len(text):
        before, at, after = text[:position], text[position], text[position + 1 :]
        return f"[{_shorten(before, from_end=True)} >|{at}|< {_shorten(after)}]"
    return f"[{_shorten(text, from_end=True)}]"


# Enough context to find the error; the message travels in a gRPC status, whose size is limited.
_CONTEXT = 80


def _shorten(text: str, from_end: bool = False) -> str:
    if len(text) <= _CONTEXT:
        return text
    return "..." + text[-_CONTEXT:] if from_end else text[:_CONTEXT] + "..."


# ---------------------------------------------------------------------------------------------
# Selectors and filters


class Operator(enum.Enum):
    PRESENT = "?"
    EQUAL = "=="
    NOT_EQUAL = "!="
    MATCHES = "~="


@dataclasses.dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    operator: Operator
    value: str = ""
    pattern: re.Pattern[str] | None = None

    def match(self, fields: FieldLookup) -> bool:
        value, present = fields(list(self.fieldpath))
        match self.operator:
            case Operator.PRESENT:
                return present
            case Operator.EQUAL:
                return present and value == self.value
            case Operator.NOT_EQUAL:
                # As in containerd: an absent field has the value "", so it is "not equal".
                return value != self.value
            case Operator.MATCHES:
                return self.pattern is not None and self.pattern.search(value) is not None
        return False


class Filter:
    """A disjunction of conjunctions of selectors; an empty conjunction matches everything."""

    def __init__(self, alternatives: Iterable[Sequence[Selector]]) -> None:
        self.alternatives: tuple[tuple[Selector, ...], ...] = tuple(map(tuple, alternatives))

    def match(self, fields: FieldLookup) -> bool:
        return any(
            all(selector.match(fields) for selector in selectors) for selectors in self.alternatives
        )

    def __repr__(self) -> str:
        return f"Filter({self.alternatives!r})"


def parse_filters(filters: Sequence[str]) -> Filter:
    """The OR of the parsed filter strings; no strings at all matches everything."""
    if isinstance(filters, str):
        # A bare string would silently be read as one filter per character.
        raise TypeError("parse_filters takes a sequence of filter strings, not a string")
    texts = list(filters)
    if not texts:
        return Filter([()])
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"filter must be a string, not {type(text).__name__}")
    return Filter(_Parser(text).parse() if text else () for text in texts)


# ---------------------------------------------------------------------------------------------
# The snapshot adaptor

_KINDS = frozenset({"active", "view", "committed"})


def snapshot_fields(name: str, parent: str, kind: str, labels: Mapping[str, str]) -> FieldLookup:
    """containerd's adaptSnapshot: kind, name, parent and labels.<key> (key joined by ".")."""
    kind = kind.lower()

    def lookup(fieldpath: list[str]) -> tuple[str, bool]:
        match fieldpath:
            case ["kind", *_]:
                return (kind, True) if kind in _KINDS else ("", False)
            case ["name", *_]:
                return name, True  # present even when empty, as in containerd
            case ["parent", *_]:
                return parent, True  # so `parent==""` selects snapshots without a parent
            case ["labels", *key]:
                if not labels:
                    return "", False
                label = ".".join(key)
                return (labels[label], True) if label in labels else ("", False)
        return "", False

    return lookup


# ---------------------------------------------------------------------------------------------
# Scanner: containerd's scanner.go, token for token


class _Kind(enum.Enum):
    EOF = "EOF"
    QUOTED = "quoted"
    VALUE = "value"
    FIELD = "field"
    SEPARATOR = "separator"
    OPERATOR = "operator"
    ILLEGAL = "illegal"
    OTHER = "other"  # a character that starts no token


@dataclasses.dataclass(frozen=True)
class _Token:
    kind: _Kind
    position: int
    text: str
    error: str = ""


# What _Scanner.next returns instead of a character; never equal to a one-character string.
_EOF = "<eof>"
_ILLEGAL = "<illegal>"

_QUOTES = frozenset('/|"')
_SEPARATORS = frozenset(",.")
_OPERATOR_CHARS = frozenset("=!~")
_FIELD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_SIMPLE_ESCAPES = frozenset("abfnrtv\\")
_OCTAL_DIGITS = frozenset("01234567")
_HEX_DIGITS = {c: int(c, 16) for c in "0123456789abcdefABCDEF"}
_NUMERIC_ESCAPE_LENGTHS = {"x": 2, "u": 4, "U": 8}
# Go's unicode.IsSpace: the Unicode White_Space property.
_SPACES = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000"
)


def _is_value_char(ch: str) -> bool:
    # Go's isValueRune: graphic (letters, marks, numbers, punctuation, symbols), not a comma.
    return len(ch) == 1 and ch != "," and unicodedata.category(ch)[0] in "LMNPS"


def _illegal_reason(ch: str) -> str:
    if ch == "\x00":
        return "unexpected null"
    if "\ud800" <= ch <= "\udfff":
        return "invalid UTF-8 (lone surrogate)"  # Go: "rune error"
    return ""


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.start = 0  # where the last character read starts
        self.end = 0  # just after it
        self.in_value = False  # an operator was just read, so what follows is a value
        self.error = ""

    def _fail(self, message: str) -> None:
        self.error = self.error or message  # keep the first, most specific, reason

    def next(self) -> str:
        if self.end >= len(self.text):
            self.start = len(self.text)
            return _EOF
        self.start = self.end
        ch = self.text[self.end]
        self.end += 1
        if reason := _illegal_reason(ch):
            self._fail(reason)
            return _ILLEGAL
        return ch

    def peek(self) -> str:
        start, end = self.start, self.end
        ch = self.next()
        self.start, self.end = start, end
        return ch

    def _skip_while(self, accept: Callable[[str], bool]) -> None:
        while accept(self.peek()):
            self.next()

    def scan(self) -> _Token:
        self.error = ""
        ch = self.next()
        while ch in _SPACES:
            ch = self.next()
        start = self.start
        if ch == _EOF:
            return _Token(_Kind.EOF, start, "")
        if ch == _ILLEGAL:
            return _Token(_Kind.ILLEGAL, start, self.text[start : self.end], self.error)
        if ch in _QUOTES:
            kind = _Kind.QUOTED if self._scan_quoted(ch) else _Kind.ILLEGAL
            return _Token(kind, start, self.text[start : self.end], self.error)
        if ch in _SEPARATORS:
            self.in_value = False
            return _Token(_Kind.SEPARATOR, start, ch)
        if ch in _OPERATOR_CHARS:
            self._skip_while(_OPERATOR_CHARS.__contains__)
            self.in_value = True
            return _Token(_Kind.OPERATOR, start, self.text[start : self.end])
        if self.in_value:
            # As in containerd, the first character of a value need not be a value character.
            self._skip_while(_is_value_char)
            self.in_value = False
            return _Token(_Kind.VALUE, start, self.text[start : self.end])
        if ch in _FIELD_CHARS:
            self._skip_while(_FIELD_CHARS.__contains__)
            return _Token(_Kind.FIELD, start, self.text[start : self.end])
        return _Token(_Kind.OTHER, start, ch)

    def _scan_quoted(self, quote: str) -> bool:
        """Reads up to the closing quote; False if the literal is unterminated or malformed."""
        legal = True
        ch = self.next()
        while ch != quote:
            if ch in ("\n", _EOF, _ILLEGAL):
                self._fail("quoted literal not terminated")
                return False
            if ch == "\\":
                ch, escape_legal = self._scan_escape(quote)
                legal = legal and escape_legal
            else:
                ch = self.next()
        return legal

    def _scan_escape(self, quote: str) -> tuple[str, bool]:
        """Reads an escape after its backslash; returns the next character and legality."""
        ch = self.next()
        if ch in _SIMPLE_ESCAPES or ch == quote:
            return self.next(), True
        if ch in _OCTAL_DIGITS:
            return self._scan_digits(ch, 8, 3)
        if ch in _NUMERIC_ESCAPE_LENGTHS:
            return self._scan_digits(self.next(), 16, _NUMERIC_ESCAPE_LENGTHS[ch])
        self._fail("illegal escape sequence")
        return ch, False

    def _scan_digits(self, ch: str, base: int, count: int) -> tuple[str, bool]:
        while count > 0 and _HEX_DIGITS.get(ch, 16) < base:
            ch = self.next()
            count -= 1
        if count > 0:
            self._fail("illegal numeric escape sequence")
            return ch, False
        return ch, True


# ---------------------------------------------------------------------------------------------
# Unquoting: Go's strconv.Unquote, extended to / and | as containerd's quote.go does


class _QuoteError(Exception):
    pass


def _unquote(literal: str) -> str:
    """The value of a quoted literal the scanner accepted (quote characters included)."""
    if len(literal) < 2 or literal[0] != literal[-1]:
        raise _QuoteError("quote syntax error")
    quote, body = literal[0], literal[1:-1]
    # Build bytes, as Go does: \x and octal escapes are raw bytes, not code points.
    out = bytearray()
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == quote:
            raise _QuoteError("quote syntax error")
        if ch != "\\":
            out += ch.encode()
            i += 1
            continue
        escaped, i = _unescape(body, i + 1, quote)
        out += escaped
    # Bytes that are not UTF-8 become lone surrogates: they then equal no real field value.
    return out.decode("utf-8", "surrogateescape")


_SIMPLE_ESCAPE_BYTES = {
    "a": b"\a",
    "b": b"\b",
    "f": b"\f",
    "n": b"\n",
    "r": b"\r",
    "t": b"\t",
    "v": b"\v",
    "\\": b"\\",
}


def _unescape(body: str, i: int, quote: str) -> tuple[bytes, int]:
    """The bytes of the escape whose letter is at body[i], and the index just after it."""
    if i >= len(body):
        raise _QuoteError("quote syntax error")
    letter = body[i]
    i += 1
    if letter in _SIMPLE_ESCAPE_BYTES:
        return _SIMPLE_ESCAPE_BYTES[letter], i
    if letter in "'\"|/":
        if letter != quote:
            raise _QuoteError(f"\\{letter} is only allowed inside {letter}...{letter}")
        return letter.encode(), i
    if letter in _OCTAL_DIGITS:
        digits = body[i - 1 : i + 2]
        if len(digits) < 3 or not set(digits) <= _OCTAL_DIGITS:
            raise _QuoteError("quote syntax error")
        value = int(digits, 8)
        if value > 255:
            raise _QuoteError(f"octal escape \\{digits} is larger than 255")
        return bytes([value]), i + 2
    if letter in _NUMERIC_ESCAPE_LENGTHS:
        count = _NUMERIC_ESCAPE_LENGTHS[letter]
        digits = body[i : i + count]
        if len(digits) < count or not all(d in _HEX_DIGITS for d in digits):
            raise _QuoteError("quote syntax error")
        value = int(digits, 16)
        if letter == "x":
            return bytes([value]), i + count
        if value > 0x10FFFF:
            raise _QuoteError(f"\\{letter}{digits} is not a Unicode code point")
        if 0xD800 <= value <= 0xDFFF:
            value = 0xFFFD  # Go encodes a surrogate as the replacement character
        return chr(value).encode(), i + count
    raise _QuoteError("quote syntax error")


# ---------------------------------------------------------------------------------------------
# Regular expressions

# POSIX classes inside brackets, not escaped: RE2 knows them, Python's re reads them as
# plain characters, which would silently match something else.
_POSIX_CLASS = re.compile(
    r"(?<!\\)(?:\\\\)*\[:\^?(?:alnum|alpha|ascii|blank|cntrl|digit|graph|lower|print|punct"
    r"|space|upper|word|xdigit):\]"
)


def _compile_regexp(pattern: str) -> re.Pattern[str]:
    """Compiles a `~=` value; raises ValueError with the reason if it is not usable."""
    if any("\ud800" <= ch <= "\udfff" for ch in pattern):
        raise ValueError("invalid UTF-8")
    if _POSIX_CLASS.search(pattern):
        raise ValueError("POSIX character classes such as [[:alpha:]] are not supported")
    try:
        return re.compile(pattern, re.ASCII)  # RE2: \d, \w, \s and \b are ASCII-only
    except re.error as exc:
        raise ValueError(str(exc)) from None
    except OverflowError:
        raise ValueError("repetition count too large") from None
    except RecursionError:
        raise ValueError("expression nests too deeply") from None


# ---------------------------------------------------------------------------------------------
# Parser: containerd's parser.go


_OPERATORS = {op.value: op for op in (Operator.EQUAL, Operator.NOT_EQUAL, Operator.MATCHES)}


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.scanner = _Scanner(text)

    def _error(self, position: int, reason: str) -> FilterError:
        return FilterError(self.text, position, reason)

    def parse(self) -> tuple[Selector, ...]:
        parsed = [self._selector()]
        while (ch := self.scanner.peek()) != _EOF:
            if ch != ",":
                position = self.scanner.end  # where the peeked character starts
                raise self._error(position, f"unexpected input: {self.text[position]!r}")
            self.scanner.scan()
            parsed.append(self._selector())
        # Regexps are compiled only once the whole string parsed, so that a syntax error is
        # reported as containerd reports it even when an earlier regexp is invalid too.
        return tuple(self._with_pattern(selector, position) for selector, position in parsed)

    def _selector(self) -> tuple[Selector, int]:
        """The selector, and where its value starts (-1 if it has none)."""
        fieldpath = self._fieldpath()
        if self.scanner.peek() in (",", _EOF):
            return Selector(fieldpath, Operator.PRESENT), -1
        operator = self._operator()
        token = self.scanner.scan()
        value = self._value(token, allow_alternative_quotes=operator is Operator.MATCHES)
        return Selector(fieldpath, operator, value), token.position

    def _with_pattern(self, selector: Selector, value_position: int) -> Selector:
        if selector.operator is not Operator.MATCHES:
            return selector
        try:
            pattern = _compile_regexp(selector.value)
        except ValueError as exc:
            raise self._error(value_position, f"invalid regular expression: {exc}") from None
        return dataclasses.replace(selector, pattern=pattern)

    def _fieldpath(self) -> tuple[str, ...]:
        fields = [self._field()]
        while self.scanner.peek() == ".":
            self.scanner.scan()
            fields.append(self._field())
        return tuple(fields)

    def _field(self) -> str:
        token = self.scanner.scan()
        match token.kind:
            case _Kind.FIELD:
                return token.text
            case _Kind.QUOTED:
                return self._unquote(token, allow_alternative_quotes=False)
            case _Kind.ILLEGAL:
                raise self._error(token.position, token.error)
        raise self._error(token.position, "expected field or quoted")

    def _operator(self) -> Operator:
        token = self.scanner.scan()
        match token.kind:
            case _Kind.OPERATOR:
                if token.text in _OPERATORS:
                    return _OPERATORS[token.text]
                raise self._error(token.position, f'unsupported operator "{token.text}"')
            case _Kind.ILLEGAL:
                raise self._error(token.position, token.error)
        raise self._error(token.position, 'expected an operator ("=="|"!="|"~=")')

    def _value(self, token: _Token, allow_alternative_quotes: bool) -> str:
        match token.kind:
            case _Kind.VALUE | _Kind.FIELD:
                return token.text
            case _Kind.QUOTED:
                return self._unquote(token, allow_alternative_quotes)
            case _Kind.ILLEGAL:
                raise self._error(token.position, token.error)
        raise self._error(token.position, "expected value or quoted")

    def _unquote(self, token: _Token, allow_alternative_quotes: bool) -> str:
        # / and | quote only regular expressions; fields and other values take "...".
        if not allow_alternative_quotes and token.text[0] != '"':
            raise self._error(token.position, "invalid quote encountered")
        try:
            return _unquote(token.text)
        except _QuoteError as exc:
            raise self._error(token.position, f"unquoting failed: {exc}") from None
