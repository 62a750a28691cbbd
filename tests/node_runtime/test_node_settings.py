"""The runtime's settings, device choices and progress coalescing, without processes."""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cyxwiz.cli import main as cyxwiz_main
from cyxwiz.credentials import write_credentials
from node_runtime.api import ApiUnavailable, Backoff
from node_runtime.device import detect_capabilities, device_for_slot, threads_per_job
from node_runtime.job_control import JobControl, StopReason
from node_runtime.progress_sender import ProgressSender
from node_runtime.settings import add_node_arguments, settings_from_args
from shared.settings import SettingsError


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_node_arguments(parser)
    return parser.parse_args(list(argv))


def test_flags_beat_environment_beats_the_credentials_file(tmp_path: Path) -> None:
    write_credentials({"api_url": "http://file:1", "join_token": "cwj_file", "redis_url": "redis://file:2/0"},
                      tmp_path)
    from_file = settings_from_args(_parse("--data-dir", str(tmp_path)), env={})
    assert (from_file.api_url, from_file.join_token) == ("http://file:1", "cwj_file")
    assert from_file.store_host is None  # never the file's (admin) store URL: registration hands one out
    env = {"CYXWIZ_JOIN_TOKEN": "cwj_env", "CYXWIZ_NODE_SLOTS": "3", "CYXWIZ_NODE_ALLOW_HTTP": "yes"}
    from_env = settings_from_args(_parse("--data-dir", str(tmp_path)), env=env)
    assert from_env.join_token == "cwj_env" and from_env.slots == 3 and from_env.allow_http
    flagged = settings_from_args(_parse("--data-dir", str(tmp_path), "--join-token", "cwj_flag", "--slots", "2",
                                        "--label", "zone=a", "--data-root", str(tmp_path)), env=env)
    assert flagged.join_token == "cwj_flag" and flagged.slots == 2 and flagged.labels == {"zone": "a"}
    assert flagged.data_root == tmp_path.resolve()


@pytest.mark.parametrize(("argv", "env", "named"), [
    ((), {}, "CYXWIZ_JOIN_TOKEN"),
    (("--join-token", "t", "--redis-url", "redis://x:port"), {}, "CYXWIZ_NODE_REDIS_HOST"),
    (("--join-token", "t"), {"CYXWIZ_NODE_SLOTS": "many"}, "CYXWIZ_NODE_SLOTS"),
    (("--join-token", "t", "--slots", "0"), {}, "--slots"),
    (("--join-token", "t", "--data-root", "/no/such/dir"), {}, "--data-root"),
    (("--join-token", "t", "--ca-file", "/no/such/ca.pem"), {}, "CYXWIZ_CA_FILE"),
    (("--join-token", "t"), {"CYXWIZ_NODE_ALLOW_HTTP": "maybe"}, "ALLOW_HTTP"),
    (("--join-token", "t", "--allow-dataset-net", "10.0.0.0/33"), {}, "--allow-dataset-net"),
    (("--join-token", "t"), {"CYXWIZ_NODE_DATASET_ALLOW_NETS": "10.0.0.0/8,intranet"}, "DATASET_ALLOW_NETS"),
    (("--join-token", "t"), {"CYXWIZ_NODE_DATASET_TIMEOUT_S": "0"}, "CYXWIZ_NODE_DATASET_TIMEOUT_S"),
    (("--join-token", "t"), {"CYXWIZ_NODE_DATASET_MIN_RATE_BPS": "fast"}, "CYXWIZ_NODE_DATASET_MIN_RATE_BPS"),
    (("--join-token", "t"), {"CYXWIZ_NODE_MAX_DATASET_MB": "0"}, "CYXWIZ_NODE_MAX_DATASET_MB must be >= 1"),
])
def test_a_missing_or_bad_setting_fails_fast_naming_it(tmp_path: Path, argv: tuple[str, ...],
                                                       env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        settings_from_args(_parse("--data-dir", str(tmp_path), *argv), env=env)


def test_dataset_limits_come_from_flags_and_environment(tmp_path: Path) -> None:
    defaults = settings_from_args(_parse("--data-dir", str(tmp_path), "--join-token", "t"), env={})
    assert defaults.dataset_allow_nets == () and defaults.dataset_timeout_s == 600.0
    assert defaults.dataset_min_rate_bps == 16384.0 and defaults.max_dataset_mb == 1024
    env = {"CYXWIZ_NODE_DATASET_ALLOW_NETS": " 10.1.2.3/8, fd00::/8 ,", "CYXWIZ_NODE_DATASET_TIMEOUT_S": "30",
           "CYXWIZ_NODE_DATASET_MIN_RATE_BPS": "1000", "CYXWIZ_NODE_MAX_DATASET_MB": "64"}
    from_env = settings_from_args(_parse("--data-dir", str(tmp_path), "--join-token", "t"), env=env)
    assert from_env.dataset_allow_nets == ("10.0.0.0/8", "fd00::/8")  # normalized
    assert (from_env.dataset_timeout_s, from_env.dataset_min_rate_bps, from_env.max_dataset_mb) == (30.0, 1000.0, 64)
    flagged = settings_from_args(_parse("--data-dir", str(tmp_path), "--join-token", "t", "--allow-dataset-net",
                                        "192.168.7.0/24", "--allow-dataset-net", "127.0.0.2"), env=env)
    assert flagged.dataset_allow_nets == ("192.168.7.0/24", "127.0.0.2/32")  # the flags replace the variable


@pytest.mark.parametrize(("given", "host"), [
    ("10.0.0.5", "10.0.0.5"), ("store.example:7000", "store.example:7000"),
    ("rediss://user:secret@store.example:6380/0", "store.example:6380"), ("[fd00::1]:6379", "[fd00::1]:6379"),
])
def test_redis_url_on_a_node_overrides_the_store_host_only(tmp_path: Path, given: str, host: str) -> None:
    settings = settings_from_args(_parse("--data-dir", str(tmp_path), "--join-token", "t", "--redis-url", given),
                                  env={})
    assert settings.store_host == host


def test_cyxwiz_node_without_a_join_token_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("CYXWIZ_JOIN_TOKEN", "CYXWIZ_REDIS_URL", "CYXWIZ_API_URL"):
        monkeypatch.delenv(name, raising=False)
    assert cyxwiz_main(["node", "--data-dir", str(tmp_path)]) == 2
    assert "no join token" in capsys.readouterr().err


def test_slots_share_the_cores_and_spread_over_gpus() -> None:
    assert threads_per_job(1, cores=2) == 1  # one core stays with the runtime on a small host
    assert threads_per_job(2, cores=16) == 8
    assert threads_per_job(64, cores=16) == 1
    assert threads_per_job(4, override=3, cores=16) == 3
    two_gpus = {"gpus": [{"name": "a"}, {"name": "b"}]}
    assert [device_for_slot(two_gpus, slot) for slot in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert device_for_slot({"gpus": []}, 0) == "cpu"
    caps = detect_capabilities("cpu")
    assert caps["device"] == "cpu" and caps["gpus"] == [] and caps["cpu_cores"] >= 1 and caps["ram_mb"] > 0


def test_backoff_grows_to_its_ceiling_and_honours_retry_after() -> None:
    backoff = Backoff(0.1, 1.0)
    delays = [backoff.next_delay() for _ in range(10)]
    assert 0.05 <= delays[0] <= 0.1 and max(delays) <= 1.0 and delays[-1] >= 0.5
    assert Backoff(0.1, 5.0).next_delay(retry_after_s=3.0) == 3.0


class SlowApi:
    """Stands in for the HTTP API in a pure unit test of coalescing: each call takes 50 ms."""

    job_id = "j-test"
    retry_max_s = 0.2

    def __init__(self, failures: int = 0) -> None:
        self.reports: list[dict[str, Any]] = []
        self.uploads: list[bytes] = []
        self.failures = failures
        self.lock = threading.Lock()

    def report(self, body: dict[str, Any]) -> dict[str, Any]:
        time.sleep(0.05)
        with self.lock:
            if self.failures:
                self.failures -= 1
                raise ApiUnavailable("503 unavailable")
            self.reports.append(body)
        return {"ok": True}

    def upload(self, name: str, data: bytes) -> None:
        time.sleep(0.05)
        self.uploads.append(data)


def test_a_slow_api_gets_the_latest_progress_and_checkpoint_never_stalling_training() -> None:
    import multiprocessing

    api = SlowApi(failures=2)
    control = JobControl(multiprocessing.get_context("spawn"))
    sender = ProgressSender(api, control, on_refused=lambda refusal: None)  # type: ignore[arg-type]
    sender.start()
    started = time.monotonic()
    for step in range(200):
        sender.send_report({"status": "running", "step": step})
        if step % 50 == 0:
            sender.save_checkpoint(bytes([step]))
    assert time.monotonic() - started < 0.5  # queuing never waits for the API
    assert sender.flush(10)
    assert 1 <= len(api.reports) < 20 and api.reports[-1]["step"] == 199  # coalesced, newest last
    assert [body["seq"] for body in api.reports] == sorted(body["seq"] for body in api.reports)
    assert api.uploads[-1] == bytes([150]) and len(api.uploads) < 4
    control.request_stop(StopReason.CANCEL)
    assert control.stop_reason == StopReason.CANCEL
    assert not control.request_stop(StopReason.DRAIN)  # a weaker reason never replaces a stronger one
    sender.close()
