"""benchmarks.common: result files are never overwritten."""

from __future__ import annotations

import json

from benchmarks.common import write_result


def test_a_second_run_on_one_day_gets_its_own_file(tmp_path):
    first = write_result("bench", {"value": 1}, directory=tmp_path)
    second = write_result("bench", {"value": 2}, directory=tmp_path)
    third = write_result("bench", {"value": 3}, directory=tmp_path)
    assert first.name.startswith("bench-") and first.suffix == ".json"
    assert second.name == first.name.replace(".json", "-2.json")
    assert third.name == first.name.replace(".json", "-3.json")
    values = [json.loads(p.read_text())["value"] for p in (first, second, third)]
    assert values == [1, 2, 3]
    assert json.loads(first.read_text())["machine"]["date"] in first.name
