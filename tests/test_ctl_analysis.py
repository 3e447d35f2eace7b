"""``ctl start-scan``'s analysis flags: each sets one key of the scan's ``analysis`` parameter.

Types are checked by argparse (exit 2 with a usage message naming the flag), bounds and model folders
by the protocol and the daemon (exit 1, ``invalid_params`` naming ``analysis.<key>``): never a traceback.
The echo server parses each request with the real protocol; a real daemon checks folders and runs a scan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.__main__ import main
from runtime.config import AnalysisConfig, ConfigError, config_from_dict, load_config
from runtime.control.client import ANALYSIS_FLAGS
from runtime.control.protocol import ANALYSIS_FOLDERS, ANALYSIS_OVERRIDES
from tests.test_client import control_server, handler, sock_dir  # noqa: F401  (sock_dir: a fixture)
from tests.test_daemon import _wait_idle, live_daemon

SYSTEMD_TOML = Path(__file__).resolve().parents[1] / "systemd" / "wsi-runtime.toml"


def test_every_analysis_key_a_scan_may_choose_has_one_flag() -> None:
    keys = [key for _, key, _ in ANALYSIS_FLAGS]
    assert sorted(keys) == sorted({*ANALYSIS_OVERRIDES, *ANALYSIS_FOLDERS})
    schema = AnalysisConfig.model_json_schema()["properties"]
    helps = {key: kwargs["help"] for _, key, kwargs in ANALYSIS_FLAGS}
    # The bounds the help text states are the config's (the daemon enforces them).
    assert (schema["subdivide"]["minimum"], schema["subdivide"]["maximum"]) == (1, 4)
    assert "1-4" in helps["subdivide"]
    assert (schema["threshold"]["exclusiveMinimum"], schema["threshold"]["exclusiveMaximum"]) == (0.0, 1.0)
    assert "0 < P < 1" in helps["threshold"]


def test_ctl_analysis_flags_become_the_analysis_parameter(
    sock_dir: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    cmd, evt = f"ipc://{sock_dir}/c.sock", f"ipc://{sock_dir}/e.sock"
    finish = control_server(cmd, evt, handler)
    base = ["ctl", "--endpoint", cmd, "--events", evt, "--retries", "1"]
    try:
        assert main([*base, "start-scan", "--name", "s1"]) == 0  # no flag: no analysis parameter
        assert json.loads(capsys.readouterr().out)["params"] == {"output_name": "s1"}
        assert main([*base, "start-scan", "--no-analysis"]) == 0
        assert json.loads(capsys.readouterr().out)["params"] == {"analysis": {"enabled": False}}
        argv = [
            *base,
            "start-scan",
            "--analysis",
            "--analysis-models",
            "trained",
            "--tumour-model",
            "models/t",
            "--nuclei-model",
            "/opt/m/n",
            "--slide-model",
            "none",
            "--no-nuclei",
            "--analysis-subdivide",
            "1",
            "--analysis-threshold",
            "0.4",
            "--autofocus-model",
            "builtin",
        ]
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out)["params"] == {
            "analysis": {
                "enabled": True,
                "models": "trained",
                "tumour_dir": "models/t",
                "nuclei_dir": "/opt/m/n",
                "slide_dir": "none",
                "nuclei": False,
                "subdivide": 1,
                "threshold": 0.4,
            },
            "models": {"autofocus_dir": "builtin"},
        }
        assert main([*base, "start-scan", "--analysis-models", "baseline", "--nuclei"]) == 0
        assert json.loads(capsys.readouterr().out)["params"] == {"analysis": {"models": "baseline", "nuclei": True}}
        # Out of the config's bounds: refused by the protocol, naming the key (exit 1, no traceback).
        for flags, words in (
            (["--analysis-subdivide", "0"], "analysis.subdivide: Input should be greater than or equal to 1"),
            (["--analysis-subdivide", "5"], "analysis.subdivide: Input should be less than or equal to 4"),
            (["--analysis-threshold", "1"], "analysis.threshold: Input should be less than 1"),
            (["--tumour-model", ""], "analysis.tumour_dir"),
        ):
            assert main([*base, "start-scan", *flags]) == 1, flags
            err = capsys.readouterr().err
            assert "error [invalid_params]" in err and words in err and "Traceback" not in err, err
    finally:
        finish()


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--analysis-subdivide", "two"], "argument --analysis-subdivide: invalid int value: 'two'"),
        (["--analysis-threshold", "nan"], "argument --analysis-threshold: not a finite number: 'nan'"),
        (["--analysis-threshold", "half"], "argument --analysis-threshold: not a number: 'half'"),
        (["--analysis-models", "neural"], "argument --analysis-models: invalid choice: 'neural'"),
        (["--analysis", "yes"], "unrecognized arguments: yes"),
        (["--backlog-mpx", "8"], "unrecognized arguments: --backlog-mpx"),  # the operator's, not a scan's
    ],
)
def test_ctl_analysis_flags_bad_types_are_usage_errors(
    flags: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:  # before any request: nothing is sent
        main(["ctl", "--endpoint", "ipc:///nonexistent/c.sock", "start-scan", *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "usage:" in err and "Traceback" not in err, err


def test_ctl_analysis_flags_with_a_real_daemon(
    tmp_path: Path, small_recording: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    with live_daemon(tmp_path, "ctl-an", small_recording, analysis={"enabled": True}) as (_, client):
        base = ["ctl", "--endpoint", client.endpoint, "--events", client.endpoint, "--retries", "15"]
        # Folders are the daemon's to check: each refusal names the flag's key; nothing is made.
        (data / "models" / "empty").mkdir(parents=True)
        for flags, words in (
            (["--tumour-model", "models/none"], "analysis.tumour_dir: "),
            (["--nuclei-model", "/etc"], "analysis.nuclei_dir: '/etc' is neither under the data root"),
            (["--slide-model", "models/empty"], "analysis.slide_dir: "),
            (["--analysis-subdivide", "9"], "analysis.subdivide: "),
        ):
            assert main([*base, "start-scan", "--name", "refused", *flags]) == 1, flags
            err = capsys.readouterr().err
            assert "error [invalid_params]" in err and words in err and "Traceback" not in err, err
        assert not (data / "refused").exists()
        # --no-analysis: the scan completes with no analysis on a daemon that runs one.
        assert main([*base, "start-scan", "--name", "off", "--no-analysis"]) == 0
        assert json.loads(capsys.readouterr().out)["output_dir"] == str(data / "off")
        assert _wait_idle(client, timeout_s=120)["last_finish"] == "completed"
    off = json.loads((data / "off" / "report.json").read_text())
    assert off["complete"] and off.get("analysis") is None and "analysis" not in off["cpu_seconds"]
    assert not (data / "off" / "annotations.geojson").exists()


@pytest.mark.parametrize("value", ["-1", "10001", '"four"', "nan", "inf"])
def test_backlog_mpx_is_checked_naming_the_key(tmp_path: Path, value: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(f"[analysis]\nbacklog_mpx = {value}\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert "analysis.backlog_mpx" in str(err.value) and str(f) in str(err.value)


def test_backlog_mpx_is_the_operators() -> None:
    assert config_from_dict({"analysis": {"backlog_mpx": 0}}).analysis.backlog_mpx == 0.0  # all at normal priority
    assert config_from_dict({}).analysis.backlog_mpx == 4.0
    assert load_config(SYSTEMD_TOML).analysis.backlog_mpx == 4.0  # the example config states the default
    assert "backlog_mpx" not in {*ANALYSIS_OVERRIDES, *ANALYSIS_FOLDERS}  # not a start_scan override
