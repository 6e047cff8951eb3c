import pytest

import ddn_layers as ddn


def test_backward_mode_names():
    assert ddn.BackwardMode.choices() == ["implicit", "full", "approx", "unroll"]
    assert ddn.BackwardMode.parse("IMPLICIT") is ddn.BackwardMode.IMPLICIT
    assert str(ddn.BackwardMode.UNROLL) == "unroll"


@pytest.mark.parametrize("bad", ["implict", "", 3, None])
def test_backward_mode_rejects_unknown(bad):
    with pytest.raises(ValueError, match=r"backward_mode must be one of \['implicit'"):
        ddn.BackwardMode.parse(bad)
