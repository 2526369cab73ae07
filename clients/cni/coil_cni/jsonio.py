"""JSON in and out for the plugin, without the ``json`` package's import cost.

``import json`` loads ``re`` and ``enum`` (for number and whitespace patterns the C accelerator
does not need), which costs about a third of the plugin's start on a 2-core machine. The
accelerator ``_json`` that ``json`` itself uses does all the work, so this module drives it
directly, with ``json``'s defaults: the same values and the same output. A document that is not
valid is handed to ``json.loads``, which raises its usual error (the accelerator reports errors
through ``json.decoder`` and needs it loaded). Where ``_json`` is missing or has another signature
(another interpreter), everything goes through ``json``. tests/test_cni_rpc.py compares both on
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
_encode: Any = None
try:
    import _json

    _scan = _json.make_scanner(_Context())  # type: ignore[arg-type]
    _encode = _json.make_encoder(
        None, _no_default, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True
    )
except (ImportError, TypeError, AttributeError):  # pragma: no cover - other interpreters
    _scan = None
    _encode = None


def loads(data: bytes) -> Any:
    """Decode a JSON document (UTF-8, a leading byte-order mark allowed), as ``json.loads``.

    Raises ValueError (json.JSONDecodeError or UnicodeDecodeError) or RecursionError."""
    text = data.decode("utf-8-sig")
    if _scan is None:  # pragma: no cover
        import json

        return json.loads(text)
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
        if not text[end:].lstrip(_WHITESPACE):
            return value
    except Exception:  # noqa: BLE001 - the accelerator needs json.decoder to report errors
        pass
    # Not a valid document: json itself says why, with its own exception and message.
    import json

    return json.loads(text)


def dumps(value: Any) -> str:
    """Encode as ``json.dumps(value)`` does with its defaults. Raises TypeError or ValueError."""
    if _encode is None:  # pragma: no cover
        import json

        return json.dumps(value)
    return "".join(_encode(value, 0))
