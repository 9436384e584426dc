"""Stop strings on streamed text, fed in pieces as the engine produces them."""

from __future__ import annotations

import pytest

from triton_vlm.engine.stop_strings import StopStrings
from triton_vlm.errors import InvalidRequest
from triton_vlm.protocol import SamplingParams


def stream(stops, pieces):
    s, out = StopStrings(stops), []
    for i, piece in enumerate(pieces):
        text, hit = s.feed(piece, final=i == len(pieces) - 1)
        out.append(text)
        if hit:
            return out, True
    return out, False


def test_a_stop_split_over_deltas_never_shows_and_ends_the_text():
    out, hit = stream(["STOP"], ["hello S", "T", "OP and more"])
    assert hit and "".join(out) == "hello " and all("S" not in piece for piece in out)


def test_the_earliest_of_several_stops_wins():
    out, hit = stream(["world", "lo"], ["hello world"])
    assert hit and "".join(out) == "hel"


def test_without_a_hit_everything_comes_out_by_the_end():
    out, hit = stream(["zzz"], ["a", "bc", "zz", "d"])
    assert not hit and "".join(out) == "abczzd"
    assert stream([], ["a", "b"]) == (["a", "b"], False)


@pytest.mark.parametrize("stop", [("",), tuple("x" * 300 for _ in range(1)), tuple(str(i) for i in range(17))])
def test_bad_stop_lists_are_refused(stop):
    with pytest.raises(InvalidRequest, match="stop"):
        SamplingParams(stop=stop).validate()


def test_stops_survive_the_trip_between_stages():
    params = SamplingParams(stop=("a", "bc"))
    assert SamplingParams.from_json(params.to_json()) == params
