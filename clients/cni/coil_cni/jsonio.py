"""JSON in and out for the plugin, without the ``json`` package's import cost.

``import json`` loads ``re`` and ``enum`` (for number and whitespace patterns the C accelerator
does not need), which costs about a third of the plugin's start on a 2-core machine. The
accelerator ``_json`` that ``json`` itself uses does all the work, so this module drives it
directly, with ``json``'s defaults: the same values and the same output. A document that is not
valid is handed to ``json.loads``, which raises its usual error (the accelerator reports errors
through ``json.decoder`` and needs it loaded). UTF-16 and UTF-32 documents, which ``json``
detects by itself, go to ``json`` too; so does everything where ``_json`` is missing or has
another signature (another interpreter). tests/test_cni_rpc.py compares both on
the same inputs.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself would cost every pod its import
if TYPE_CHECKING:
    from typing import Any

_WHITESPACE = " \t\n\r"


class _Context:
    """What ``_json.make_scanner`` reads from a decoder: json.JSONDecoder's defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # float("NaN"), float("Infinity"), float("-Infinity"), as json does


def _no_default(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_scan: Any = None
try:
    import _json

    _scan = _json.make_scanner(_Context())  # type: ignore[arg-type]
    _json.make_encoder(
        {}, _no_default, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True
    )
except (ImportError, TypeError, AttributeError):  # pragma: no cover - other interpreters
    _scan = None


def loads(data: bytes) -> Any:
    """Decode a JSON document, as ``json.loads(data)`` does.

    Raises ValueError (json.JSONDecodeError or UnicodeDecodeError) or RecursionError."""
    if _scan is None or data[:2].count(0) or data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        # No accelerator, or UTF-16/32 (a NUL in the first two bytes, or their byte-order mark):
        # json detects those encodings itself.
        import json

        return json.loads(data)
    if data[:3] == b"\xef\xbb\xbf":  # a UTF-8 byte-order mark, which json skips
        data = data[3:]
    text = data.decode("utf-8", "surrogatepass")
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
        if not text[end:].lstrip(_WHITESPACE):
            return value
    except Exception:  # noqa: BLE001 - the accelerator needs json.decoder to report errors
        pass
    # Not a valid document: json itself says why, with its own exception and message.
    import json

    return json.loads(data)


def dumps(value: Any) -> str:
    """Encode as ``json.dumps(value)`` does with its defaults. Raises TypeError or ValueError."""
    if _scan is None:  # pragma: no cover
        import json

        return json.dumps(value)
    # A fresh markers dict per call, as json's encoder: it detects circular references.
    encode = _json.make_encoder(
        {}, _no_default, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True
    )
    return "".join(encode(value, 0))
