from pathlib import Path

import pytest

from runtime.__main__ import defaults_as_toml
from runtime.config import ConfigError, load_config, with_overrides


def test_defaults_round_trip_through_toml(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(defaults_as_toml())
    cfg = load_config(f)
    assert cfg.scan.overlap == pytest.approx(0.10)
    assert cfg.writer.tile == 512


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[scan]\noverlap = 0.7\n", "scan.overlap"),
        ("[writer]\ncompression = 'gif'\n", "writer.compression"),
        ("[focus]\nsweep_steps = 'nine'\n", "focus.sweep_steps"),
        ("[scan]\nnot_a_key = 1\n", "scan.not_a_key"),
        ("[writer]\ntile = 500\n", "writer.tile"),
        ("[driver]\nfactory = 'no colon'\n", "driver.factory"),
        ("this is = not toml [", "not valid TOML"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert needle in str(err.value)
    assert str(f) in str(err.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_overrides_are_validated() -> None:
    cfg = with_overrides(load_config(None), {"focus": {"sweep_steps": 5}})
    assert cfg.focus.sweep_steps == 5 and cfg.focus.sweep_half_range_um == 3.0
    with pytest.raises(ConfigError, match=r"focus\.sweep_steps"):
        with_overrides(cfg, {"focus": {"sweep_steps": 1}})
