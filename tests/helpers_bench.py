"""Shared pieces of the ``ptune-rt bench --quick`` smoke tests."""
from __future__ import annotations

import json
from pathlib import Path

from ptune_rt.cli import main as cli_main


def json_numbers(obj, where="results"):
    """Yield (path, number) for every int/float in a JSON tree."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from json_numbers(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from json_numbers(v, f"{where}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield where, obj


def check_mode_and_plan(res: dict, mode: str) -> None:
    """The run records its mode, and its plan: an ETA at the start, the wall time, every planned call done."""
    assert res["mode"] == mode
    plan = res["plan"]
    assert plan["eta_at_start_s"] > 0 and plan["wall_s"] > 0
    assert plan["kinds"] and all(k["done"] == k["calls"] for k in plan["kinds"].values()), plan["kinds"]


def check_speed_verdicts(targets: list[dict], rounds: int) -> None:
    """Timed targets of a run with fewer rounds than a verdict needs are inconclusive, whatever was measured;
    exact ones (counts, bytes) are PASS or MISS."""
    from ptune_rt.bench.report import INCONCLUSIVE, MIN_ROUNDS_FOR_VERDICT

    assert rounds < MIN_ROUNDS_FOR_VERDICT
    for t in targets:
        if t["ci95"] is not None:
            assert t["verdict"] == INCONCLUSIVE and t["pass"] is None and t["rounds"] == rounds, t
        else:
            assert t["verdict"] in ("PASS", "MISS") and t["pass"] is (t["verdict"] == "PASS"), t


def run_quick(tmp_path: Path, stem: str, *args: str) -> tuple[dict, str]:
    """Run ``ptune-rt bench --quick --out tmp_path *args``; check it exits 0 and writes ``stem``.json /
    .md / .png (non-empty, the PNG a real PNG); return (parsed JSON, markdown text)."""
    rc = cli_main(["bench", *args, "--quick", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    js, md, png = (tmp_path / f"{stem}.{ext}" for ext in ("json", "md", "png"))
    for f in (js, md, png):
        assert f.is_file() and f.stat().st_size > 0, f
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads(js.read_text()), md.read_text()
