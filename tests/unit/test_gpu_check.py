"""The GPU check's driver: each step in its own process under its own deadline; a step that hangs is cut
off and the next one still runs; the summary is written either way."""

from __future__ import annotations

import json

from triton_vlm_clients import gpu_check


def test_a_step_past_its_deadline_is_cut_off_and_the_next_runs(tmp_path, monkeypatch):
    # 2 s in a dry run: pytest alone takes longer than that to start
    monkeypatch.setitem(gpu_check.STEPS, "gpu_tests", 2 / gpu_check.DRY_RUN_SLOWER)
    code = gpu_check._drive(tmp_path / "out", tmp_path / "work", dry_run=True, budget_s=60,
                            steps=["gpu_tests", "environment"])
    summary = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert code == 1 and summary["ok"] is False
    assert summary["steps"]["gpu_tests"] == {"error": "timed out after 2 s", "ok": False,
                                             "seconds": summary["steps"]["gpu_tests"]["seconds"]}
    assert summary["steps"]["gpu_tests"]["seconds"] < 10
    environment = summary["steps"]["environment"]
    assert environment["ok"] and environment["stub_missing_libraries"] == []


def test_steps_left_when_the_budget_is_spent_are_reported_not_run(tmp_path):
    code = gpu_check._drive(tmp_path / "out", tmp_path / "work", dry_run=True, budget_s=12,
                            steps=["environment", "server_parity"])
    steps = json.loads((tmp_path / "out" / "gpu-check.json").read_text())["steps"]
    assert code == 1
    assert steps["server_parity"] == {"ok": False, "error": "not run: the budget was spent"}
