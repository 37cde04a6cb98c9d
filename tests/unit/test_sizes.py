"""Size flags: what parses, what is refused, and that every error names its flag."""
import pytest

from tlstap.errors import UsageError
from tlstap.sizes import RING_MAX, format_size, next_pow2, parse_size


@pytest.mark.parametrize("text,bare,want", [("4096", 1, 4096), ("256K", 1, 256 << 10), ("8m", 1, 8 << 20),
                                            ("1GiB", 1, 1 << 30), ("1T", 1, 1 << 40), ("64", 1024, 64 << 10),
                                            ("0", 1, 0)])
def test_parses(text, bare, want):
    assert parse_size(text, "--x", bare_unit=bare) == want


@pytest.mark.parametrize("text", ["lots", "", "-1", "8Q", "1.5M", "K", "+8"])
def test_refused_naming_the_flag(text):
    with pytest.raises(UsageError) as e:
        parse_size(text, "--max-body")
    assert str(e.value).startswith(f"--max-body {text}:")


def test_format_and_ring_max():
    assert [format_size(n) for n in (4096, 8 << 20, 3 << 30, 1000, 0)] == ["4K", "8M", "3G", "1000", "0"]
    assert RING_MAX == 1 << 31 and format_size(RING_MAX) == "2G"
    assert next_pow2(3 << 30) == 4 << 30 > RING_MAX
