from __future__ import annotations

import re
from pathlib import Path

import pytest

import vectorsync
from vectorsync import _failpoints


def test_a_spec_names_a_point_and_the_pass_to_die_at() -> None:
    assert _failpoints.parse("after_sink_write:3") == ("after_sink_write", 3)
    assert _failpoints.parse("after_state_commit") == ("after_state_commit", 1)


@pytest.mark.parametrize("spec", ["after_sink_wirte:1", "after_sink_write:0", "after_sink_write:x"])
def test_a_spec_that_would_never_fire_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="VECTORSYNC_FAILPOINT") as exc:
        _failpoints.parse(spec)
    if "wirte" in spec:
        assert "after_sink_write, after_state_commit" in str(exc.value)


def test_every_declared_point_is_passed_by_the_code() -> None:
    """The crash trials kill at each declared point: one the code never passes would
    leave a trial waiting for a death that cannot come."""
    src = Path(vectorsync.__file__).parent
    passed = {
        name
        for path in src.rglob("*.py")
        for name in re.findall(r"_failpoints\.hit\(\"(\w+)\"\)", path.read_text())
    }
    assert passed == {*_failpoints.POINTS, *_failpoints.OPTIONAL}
