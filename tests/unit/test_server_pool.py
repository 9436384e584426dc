"""The watched server list (`--encoder-urls-file`, `--prefill-urls-file`) and the remote servers' gauges keep
following what they watch after one bad read: before, an exception ended their thread for good, and the
server went on with the old list (or stale gauges) without a word."""

from __future__ import annotations

import sys
import threading
from unittest import mock

from tests.conftest import wait_until
from triton_vlm.server_pool import ServerPool


def test_a_list_file_that_is_not_text_for_a_while_is_followed_again(tmp_path):
    urls_file = tmp_path / "encoders.txt"
    urls_file.write_text("127.0.0.1:1\n")
    seen: list[list[str]] = []
    warnings: list[str] = []
    pool = ServerPool([], "image_encoder")
    pool.watch(str(urls_file), seen.append, warnings.append, interval_s=0.02)
    wait_until(lambda: seen == [["127.0.0.1:1"]], 5, "the first list")
    urls_file.write_bytes(b"\xff\xfe1\x002\x007\x00")  # an editor's UTF-16 save: not UTF-8
    wait_until(lambda: warnings, 5, "the warning")
    urls_file.write_text("127.0.0.1:2\n127.0.0.1:3\n")
    wait_until(lambda: seen[-1] == ["127.0.0.1:2", "127.0.0.1:3"], 5, "the list after the bad one")
    assert pool.urls == ["127.0.0.1:2", "127.0.0.1:3"]
    assert warnings == [f"the server list {urls_file} cannot be used ({urls_file} is not UTF-8 text); the servers "
                        "stay 127.0.0.1:1"], "said once"


def test_a_failing_change_callback_does_not_end_the_watch(tmp_path):
    urls_file = tmp_path / "prefill.txt"
    urls_file.write_text("127.0.0.1:1\n")
    calls: list[list[str]] = []

    def on_change(urls):
        calls.append(urls)
        if len(calls) == 1:
            raise RuntimeError("the log could not be written")

    pool = ServerPool([], "language_model")
    pool.watch(str(urls_file), on_change, lambda message: None, interval_s=0.02)
    wait_until(lambda: calls, 5, "the first change")
    urls_file.write_text("127.0.0.1:4\n")
    wait_until(lambda: calls[-1] == ["127.0.0.1:4"], 5, "the second change")


def test_remote_server_gauges_go_on_after_a_failed_publish(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", mock.MagicMock())
    monkeypatch.delitem(sys.modules, "triton_vlm.serving.metrics", raising=False)
    from triton_vlm.serving.metrics import RemoteServerMetrics

    answers = iter([{"a:1": (0, True)}, RuntimeError("metrics API refused"), {"a:1": (7, False)}])
    published = threading.Event()

    def state():
        answer = next(answers, None)
        if answer is None:
            published.set()
            return {}
        if isinstance(answer, Exception):
            raise answer
        return answer

    gauges = RemoteServerMetrics("encoder", state, interval_s=0.02)
    try:
        assert published.wait(5), "the gauges stopped after the failure"
    finally:
        gauges.stop()
    assert mock.call(7) in gauges.in_flight(encoder="a:1").metric.set.call_args_list
