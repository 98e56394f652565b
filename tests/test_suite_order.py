from pathlib import Path

from conftest import SLOWEST_FIRST


def test_the_tests_started_first_exist():
    """A renamed slow test would silently lose its early start: every name conftest orders first is defined."""
    sources = "".join(path.read_text() for path in Path(__file__).parent.glob("test_*.py"))
    assert [name for name in SLOWEST_FIRST if f"def {name}(" not in sources] == []
    assert len(set(SLOWEST_FIRST)) == len(SLOWEST_FIRST)
