"""How a language request's outputs go back (`serving/responses.py`), with a recording response sender in
place of Triton's: one FINAL always, deltas merged when the outbox falls behind, one answer when not
streaming, and a client that left (cancelled, or a failing send) ends its generation."""

from __future__ import annotations

import threading
import time

from triton_vlm.engine.sequence import StepOutput
from triton_vlm.errors import InvalidRequest
from triton_vlm.serving.responses import InFlight, Outbox, ResponseStream


class Wire:
    FINAL = 1

    @staticmethod
    def response(ids, text, finish_reason, num_input_tokens, num_output_tokens):
        return ("response", list(ids), text, finish_reason, num_input_tokens, num_output_tokens)

    @staticmethod
    def error(e):
        return ("error", str(e))


class Sender:
    def __init__(self, first_send_s: float = 0.0, fail: bool = False, cancelled: bool = False) -> None:
        self.sent, self.first_send_s, self.fail, self.cancelled = [], first_send_s, fail, cancelled
        self.done, self.started = threading.Event(), threading.Event()

    def send(self, response, flags=0):
        if self.fail:
            raise RuntimeError("the client is gone")
        if not self.sent:
            self.started.set()
            time.sleep(self.first_send_s)
        self.sent.append((response, flags))
        if flags == Wire.FINAL:
            self.done.set()

    def is_cancelled(self):
        return self.cancelled


class Handle:
    def __init__(self) -> None:
        self.cancelled = 0

    def cancel(self):
        self.cancelled += 1


def outputs(n: int, finish="length"):
    return [StepOutput([i], f"t{i}", finish if i == n - 1 else None) for i in range(n)]


def run(sender, stream=True, outs=None):
    outbox = Outbox()
    rs = ResponseStream(outbox, Wire, sender, "r1", stream, num_input_tokens=7, arrival_s=time.time())
    first, *rest = outs or outputs(6)
    rs(first)
    if sender.first_send_s:  # the rest queue up while the first is being sent
        assert sender.started.wait(5)
    for out in rest:
        rs(out)
    sender.done.wait(5)
    outbox.close()
    return sender.sent, rs


def test_a_slow_send_merges_the_deltas_queued_behind_it_and_ends_with_one_final():
    sent, _ = run(Sender(first_send_s=0.3))
    assert [r[1] for r, _ in sent] == [[0], [1, 2, 3, 4, 5]]
    assert sent[1][0][2] == "t1t2t3t4t5" and sent[1][0][3] == "length" and sent[1][0][5] == 6
    assert [flags for _, flags in sent] == [0, Wire.FINAL]


def test_without_streaming_one_answer_holds_everything():
    sent, _ = run(Sender(), stream=False)
    assert sent == [(("response", [0, 1, 2, 3, 4, 5], "t0t1t2t3t4t5", "length", 7, 6), Wire.FINAL)]


def test_an_error_is_the_final_response():
    sent, _ = run(Sender(), outs=[StepOutput([], "", "error", InvalidRequest("bad"))])
    assert sent == [(("error", "bad"), Wire.FINAL)]


def test_a_cancelled_or_failing_client_ends_its_generation():
    for sender in (Sender(cancelled=True), Sender(fail=True)):
        outbox = Outbox()
        rs = ResponseStream(outbox, Wire, sender, "r1", True, num_input_tokens=7, arrival_s=time.time())
        rs.attach(Handle())
        rs.checked -= 1  # the last cancel check was long ago
        rs(StepOutput([0], "t0"))  # not the end: the stream is asked whether its client is still there
        outbox.close()
        assert rs.handle.cancelled == 1


def test_cancel_by_id_reaches_the_unfinished_requests_of_that_id_only():
    in_flight, outbox = InFlight(), Outbox()
    streams = [ResponseStream(outbox, Wire, Sender(), rid, True, num_input_tokens=7, arrival_s=time.time(),
                              in_flight=in_flight) for rid in ("a", "a", "b")]
    late = Handle()
    assert in_flight.cancel("b") and late.cancelled == 0  # before the engine's handle is attached
    streams[2].attach(late)
    assert late.cancelled == 1
    for rs in streams[:2]:
        rs.attach(Handle())
    streams[1](StepOutput([0], "t0", "length"))  # the second "a" has finished
    assert streams[1].sender.done.wait(5)
    assert in_flight.cancel("a") and not in_flight.cancel("c")
    assert [rs.handle.cancelled for rs in streams] == [1, 0, 1]
    streams[0](StepOutput([], "", "cancelled"))
    assert streams[0].sender.done.wait(5)
    assert not in_flight.cancel("a")  # nothing of "a" runs: a later request reusing the id is spared
    outbox.close()


def test_an_answer_that_cannot_be_built_still_ends_its_request_with_an_error():
    class Broken(Wire):
        @staticmethod
        def response(*args):
            raise TypeError("Object of type int64 is not JSON serializable")

    sender, outbox = Sender(), Outbox()
    stream = ResponseStream(outbox, Broken, sender, "r1", False, num_input_tokens=7, arrival_s=time.time())
    for out in outputs(3):
        stream(out)
    assert sender.done.wait(10)
    outbox.close()
    assert sender.sent == [(("error", "the answer could not be sent: Object of type int64 is not JSON serializable"),
                            Wire.FINAL)]


def test_metrics_that_fail_cost_no_response_and_stop_no_other_stream():
    class Failing:
        """The engine's metrics, failing the way a stats read racing the engine thread, or a metric call
        into a server that is stopping, can."""

        def ended(self, reason):
            raise RuntimeError("metrics are broken")

        def first_token(self, arrival_s):
            raise RuntimeError("metrics are broken")

    def publish():
        raise RuntimeError("dictionary changed size during iteration")

    outbox = Outbox(after_sending=publish)
    senders = [Sender(), Sender()]
    for i, sender in enumerate(senders):  # the second comes after the outbox met the first's failures
        stream = ResponseStream(outbox, Wire, sender, f"r{i}", True, num_input_tokens=7, arrival_s=time.time(),
                                metrics=Failing())
        for out in outputs(2):
            stream(out)
        assert sender.done.wait(5), f"stream {i} got no final response"
    outbox.close()
    assert [sum((r[1] for r, _ in s.sent), []) for s in senders] == [[0, 1]] * 2  # each its own tokens, all
