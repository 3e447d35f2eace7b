"""``python -m bench inference``: every committed model folder on the backends that run here, with parity."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.inference import BUILTIN, _parity


def test_inference_bench_json_covers_every_builtin_folder() -> None:
    cmd = [sys.executable, "-m", "bench", "inference", "--runs", "2", "--warmup", "1", "--batches", "2", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    folders = {p.name for p in BUILTIN.iterdir() if (p / "model.json").is_file()}
    cpu = [r for r in result["rows"] if r["backend"] == "ort_cpu"]
    assert {r["model"] for r in cpu} == folders
    for r in cpu:
        assert r["ms"] > 0 and r["items_per_s"] > 0
        assert r["parity"] == 0.0 and r["parity_abs"] == 0.0, "ort_cpu is its own reference"
        outputs = json.loads((BUILTIN / r["model"] / "model.json").read_text())["outputs"]
        assert r["parity_output"] in {o["name"] for o in outputs}
        assert r["batch"] == (256 if r["task"] == "slide_mil" else 2)
    # Every backend that did not run says why, per folder.
    ran = {(r["model"], r["backend"]) for r in result["rows"]}
    for name in folders:
        for backend in ("tensorrt", "ort_cuda"):
            assert (name, backend) in ran or f"{name}/{backend}" in result["refused"]


def test_inference_bench_rejects_an_unknown_backend() -> None:
    from bench.inference import measure

    a = argparse.Namespace(
        models=[BUILTIN / "tumour"], batches=[1], runs=1, warmup=0, cpu_threads=1, backends=["cuda"], engine_cache=None
    )
    try:
        measure(a)
    except ValueError as err:
        assert "cuda" in str(err)
    else:
        raise AssertionError("an unknown backend must be refused")


def test_parity_is_relative_to_the_output_range() -> None:
    ref: dict[str, Any] = {"p": np.array([0.0, 0.5, 1.0]), "e": np.array([10.0, 20.0, 30.0])}
    assert _parity(ref, ref)[:2] == (0.0, 0.0)
    got = {"p": np.array([0.0, 0.5, 1.01]), "e": np.array([10.0, 20.0, 30.0])}
    rel, absolute, name = _parity(got, ref)
    assert abs(rel - 0.01) < 1e-9 and abs(absolute - 0.01) < 1e-9 and name == "p"
    got = {"p": ref["p"], "e": np.array([10.0, 22.0, 30.0])}  # 2 over a range of 20
    rel, absolute, name = _parity(got, ref)
    assert abs(rel - 0.1) < 1e-9 and abs(absolute - 2.0) < 1e-9 and name == "e"


def test_inference_bench_times_a_model_folder_given_by_path(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench", "inference", "--models", str(BUILTIN / "classifier"), "--runs", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "classifier" in proc.stdout and "tumour" not in proc.stdout
