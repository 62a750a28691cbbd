"""Settings read from the environment: values that cannot work together fail at start, naming the variables."""

from __future__ import annotations

import pytest

from shared.settings import Settings, SettingsError


def test_a_gang_larger_than_the_schedule_scan_is_refused_at_start() -> None:
    # a gang's nodes are found among the top CYXWIZ_SCHEDULE_SCAN free nodes of a class: a larger one never runs
    with pytest.raises(SettingsError, match=r"CYXWIZ_MAX_GANG_NODES \(65\) must be <= CYXWIZ_SCHEDULE_SCAN \(64\)"):
        Settings.from_env({"CYXWIZ_MAX_GANG_NODES": "65"})
    with pytest.raises(SettingsError, match=r"CYXWIZ_MAX_GANG_NODES \(16\) must be <= CYXWIZ_SCHEDULE_SCAN \(8\)"):
        Settings.from_env({"CYXWIZ_SCHEDULE_SCAN": "8"})
    settings = Settings.from_env({"CYXWIZ_SCHEDULE_SCAN": "8", "CYXWIZ_MAX_GANG_NODES": "8"})
    assert (settings.schedule_scan, settings.max_gang_nodes) == (8, 8)
