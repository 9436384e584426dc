"""The relay's ledger (`serving/relay.py`): a request whose language_model stub died ends with one error, once;
the requests of a live stub, and the ones that ended, are left alone."""

from __future__ import annotations

import threading

from triton_vlm.serving.relay import Relays


class Client:
    """One request's client: what reached it, and whether its stream is still there."""

    def __init__(self, gone: bool = False) -> None:
        self.got: list[tuple[object, bool]] = []
        self.gone = gone

    def __call__(self, response, final: bool) -> None:
        if self.gone:
            raise RuntimeError("the stream is closed")
        self.got.append((response, final))


def relays(live: set[int]) -> Relays:
    return Relays(lambda: set(live), lambda: "lost")  # not started: each test looks at the stubs itself


def test_the_requests_of_a_dead_stub_end_with_one_error_and_nothing_after_it():
    live = {10}
    book = relays(live)
    a, b = Client(), Client()
    ra, rb = book.open(a), book.open(b)
    assert ra.send("token 1") and rb.send("token 1")
    assert book.check() == 0  # the stub lives: nothing happens
    live.clear()
    assert book.check() == 2
    assert a.got == b.got == [("token 1", False), ("lost", True)]
    assert not ra.send("token 2") and not ra.send(None, final=True)  # the stub's late words, if any, go nowhere
    assert book.check() == 0  # ended once
    assert a.got == [("token 1", False), ("lost", True)]


def test_a_request_the_reloaded_stub_took_lives_on():
    live = {10}
    book = relays(live)
    old = Client()
    book.open(old)
    live.clear()
    book.check()
    live.add(11)  # the model reloaded
    book.check()
    new = Client()
    relayed = book.open(new)
    assert book.check() == 0 and relayed.send("answer", final=True)
    assert new.got == [("answer", True)]
    assert old.got == [("lost", True)]


def test_an_ended_request_is_left_alone_when_its_stub_dies():
    live = {10}
    book = relays(live)
    client = Client()
    relayed = book.open(client)
    assert relayed.send("answer", final=True)
    live.clear()
    assert book.check() == 0
    assert client.got == [("answer", True)]


def test_a_request_opened_while_no_stub_lived_is_not_watched():
    """Triton answers it itself (the instance is not healthy), and the relay passes that on."""
    live: set[int] = set()
    book = relays(live)
    client = Client()
    relayed = book.open(client)
    assert book.check() == 0
    assert relayed.send("stub process is not healthy", final=True)
    assert client.got == [("stub process is not healthy", True)]


def test_a_gone_client_ends_its_relay():
    live = {10}
    book = relays(live)
    relayed = book.open(Client(gone=True))
    assert not relayed.send("token")
    assert relayed.ended
    live.clear()
    assert book.check() == 0


def test_the_watch_ends_lost_streams_on_its_own():
    live = {10}
    book = Relays(lambda: set(live), lambda: "lost", watch_s=0.01).start()
    try:
        ended = threading.Event()
        book.open(lambda response, final: ended.set())
        live.clear()
        assert ended.wait(5)
    finally:
        book.stop()
