"""``errors.one_line``: the one helper that puts a library's exception text on the CLI's one line."""

from __future__ import annotations

import pytest

from medseg.errors import one_line


def test_one_line_folds_whitespace_and_names_an_empty_exception():
    assert one_line(ValueError("bad\n  header\tvalue\n")) == "bad header value"
    assert one_line(KeyError()) == "KeyError"
    assert one_line("  two\nlines ") == "two lines"
    assert one_line(UserWarning("a\nwarning")) == "a warning"


@pytest.mark.parametrize(
    ("exc", "kwargs", "expected"),
    [
        (OSError("disk\nfull"), {"with_type": True}, "OSError: disk full"),
        (KeyError(), {"with_type": True}, "KeyError"),
        (ValueError("x" * 300), {"limit": 200}, "x" * 197 + "..."),
        (ValueError("x" * 200), {"limit": 200}, "x" * 200),
        (RuntimeError("y" * 50), {"with_type": True, "limit": 10}, "RuntimeError: yyyyyyy..."),
    ],
)
def test_one_line_type_and_limit(exc, kwargs, expected):
    assert one_line(exc, **kwargs) == expected
