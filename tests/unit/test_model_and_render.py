from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

import vectorsync
from vectorsync.config import MappingConfig
from vectorsync.errors import RecordError, RenderError
from vectorsync.model import NAMESPACE, point_id
from vectorsync.render import Renderer, _plain_parts


@given(st.text(min_size=1).filter(lambda s: "\x1f" not in s), st.one_of(st.integers(), st.text()))
def test_point_id_is_uuid5_of_mapping_and_key(mapping: str, key: int | str) -> None:
    assert point_id(mapping, key) == str(uuid.uuid5(NAMESPACE, f"{mapping}\x1f{key}"))


def test_separator_prevents_concatenation_collisions() -> None:
    assert point_id("ab", "c") != point_id("a", "bc")


def _mapping(text: str, **kw: object) -> MappingConfig:
    return MappingConfig(name="m", source="s", table="t", text=text, sink="k", **kw)  # type: ignore[arg-type]


@given(
    st.dictionaries(
        st.sampled_from(["title", "body"]),
        st.one_of(st.none(), st.text(), st.integers(), st.floats(allow_nan=False)),
        min_size=2,
    )
)
def test_plain_template_fast_path_matches_jinja(row: dict[str, object]) -> None:
    fast = Renderer(_mapping("{{ title }}\n{{body}} end"))
    assert fast._parts is not None
    try:
        expected = fast._template.render(row)
    except Exception:
        return
    if expected.strip():
        assert fast.render(row).text == expected


def test_templates_with_logic_use_jinja() -> None:
    assert _plain_parts("{{ title | upper }}") is None
    assert _plain_parts("{% if a %}x{% endif %}") is None
    assert Renderer(_mapping("{{ title | upper }}")).render({"title": "a"}).text == "A"


def test_render_errors_are_record_errors_with_kinds() -> None:
    with pytest.raises(RenderError, match="'nope' is undefined"):
        Renderer(_mapping("{{ nope }}")).render({"title": "x"})
    with pytest.raises(RecordError) as info:
        Renderer(_mapping("{{ title }}")).render({"title": None})
    assert info.value.kind == "empty_text"
    with pytest.raises(RenderError, match="payload field 'blob' holds a bytes"):
        Renderer(_mapping("{{ t }}", payload=("blob",))).render({"t": "x", "blob": b"\x00"})


def test_public_api_is_guarded() -> None:
    assert sorted(vectorsync.__all__) == sorted(
        [
            "Change",
            "Config",
            "ConfigError",
            "Engine",
            "MappingStatus",
            "PermanentError",
            "Point",
            "RecordError",
            "RecordState",
            "RetryableError",
            "RunResult",
            "SinkRecord",
            "VectorsyncError",
            "load_config",
            "parse_config",
            "point_id",
        ]
    )
    for name in vectorsync.__all__:
        assert getattr(vectorsync, name) is not None
