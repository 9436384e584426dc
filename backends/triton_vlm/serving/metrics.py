"""Our Prometheus metrics, as python-backend custom metrics on Triton's metrics port (next to Triton's own
`nv_*`). Each stage makes the families it updates; a family made in several processes is one series set
per label values (an instance's own labels keep them apart where they would collide)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import triton_python_backend_utils as pb_utils

log = logging.getLogger(__name__)
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
SHARD_BUCKETS = (1, 2, 3, 4, 6, 8, 16)
KV_TRANSFER_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metric:
    """A metric family; `metric(**labels)` is one series.

    Every update goes through one lock per process: the python backend's metric calls are not
    thread-safe (concurrent updates from the encode stage's worker threads crashed tritonserver with
    boost::interprocess::lock_exception and std::bad_alloc)."""

    _lock = threading.Lock()

    def __init__(self, name: str, description: str, counter: bool = False,
                 buckets: Sequence[float] | None = None) -> None:
        """A gauge; a counter; or, with `buckets` (upper bounds), a histogram."""
        kind = (pb_utils.MetricFamily.HISTOGRAM if buckets is not None else
                pb_utils.MetricFamily.COUNTER if counter else pb_utils.MetricFamily.GAUGE)
        with Metric._lock:
            self.family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
        self.buckets = None if buckets is None else [float(b) for b in buckets]
        self._series: dict = {}  # the family must outlive its series: both are kept

    def __call__(self, **labels: str) -> _Series:
        key = tuple(sorted(labels.items()))
        with Metric._lock:
            if key not in self._series:
                extra = {} if self.buckets is None else {"buckets": self.buckets}
                self._series[key] = _Series(self.family.Metric(labels=labels, **extra))
            return self._series[key]


class _Series:
    def __init__(self, metric) -> None:
        self.metric = metric

    def increment(self, value: float) -> None:
        with Metric._lock:
            self.metric.increment(value)

    def set(self, value: float) -> None:
        with Metric._lock:
            self.metric.set(value)

    def observe(self, value: float) -> None:
        with Metric._lock:
            self.metric.observe(value)


_request_errors: list[Metric] = []
_request_errors_lock = threading.Lock()


def request_errors() -> Metric:
    """Made once per process, under a lock: threads that answer their first errors at the same moment
    would each make the family, and the loser's exception cost its request its answer."""
    with _request_errors_lock:
        if not _request_errors:
            _request_errors.append(Metric("triton_vlm_request_errors_total", "Requests a step ended with an "
                                          "error, by step and kind (invalid_request, unavailable, internal_error)",
                                          counter=True))
        return _request_errors[0]


def embedding_cache(megabytes: int, redis_url: str = "", tier: str = "local"):
    """The encode stage's embedding cache with its metrics (hits by tier, misses, bytes), or None when off.
    `tier`: what this server's own cache is called (an E/PD encoder server's is "encoder")."""
    from ..encode.embedding_cache import EmbeddingCache
    from ..encode.redis_tier import RedisTier

    if megabytes <= 0 and not redis_url:
        return None
    hits = Metric("triton_vlm_embedding_cache_hits_total", "Images whose embeddings came from a cache tier "
                  "(a repeat inside one request counts as a hit of this server's own tier)", counter=True)
    misses = Metric("triton_vlm_embedding_cache_misses_total", "Images encoded", counter=True)
    in_use = Metric("triton_vlm_embedding_cache_bytes", "Bytes this server's own embedding cache holds")

    def counted(tier_hits: dict[str, int], n_misses: int) -> None:
        for name, n in tier_hits.items():
            hits(tier=tier if name == "local" else name).increment(n)
        misses(tier=tier).increment(n_misses)
        in_use(tier=tier).set(cache.bytes)

    cache = EmbeddingCache(megabytes * 2**20, RedisTier(redis_url) if redis_url else None, on_lookup=counted)
    return cache


class EncodeMetrics:
    """The encode stage: shards per request that encoded anything."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.shards = Metric("triton_vlm_encode_shards", "Shards a request's images (the cache's misses) were "
                             "split into", buckets=SHARD_BUCKETS)

    def encoded(self, shards: int) -> None:
        self.shards(stage=self.stage).observe(shards)


class ReplicaMetrics:
    """One vision encoder replica (a Triton instance): the images and patches it encoded."""

    def __init__(self, replica: str) -> None:
        self.replica = replica
        self.images = Metric("triton_vlm_encoder_images_total", "Images (InternVL: tiles) this replica encoded",
                             counter=True)
        self.patches = Metric("triton_vlm_encoder_patches_total",
                              "Rows of pixel values (patches; InternVL: tiles) this replica encoded", counter=True)

    def encoded(self, images: int, patches: int) -> None:
        self.images(replica=self.replica).increment(images)
        self.patches(replica=self.replica).increment(patches)


class RemoteServerMetrics:
    """E/PD's encoder servers (`kind` "encoder": image tokens) or E/P/D's prefill servers ("prefill": prompt
    tokens): each one's tokens in flight from this server, and whether its last answer (or probe) was good
    (every `interval_s`, from `state() -> {url: (tokens in flight, up)}`)."""

    def __init__(self, kind: str, state, interval_s: float = 1.0) -> None:
        tokens = {"encoder": "Image tokens", "prefill": "Prompt tokens"}[kind]
        self.kind = kind
        self.in_flight = Metric(f"triton_vlm_remote_{kind}_in_flight_tokens",
                                f"{tokens} this server has in flight on each {kind} server")
        self.up = Metric(f"triton_vlm_remote_{kind}_up", f"1 if a {kind} server's last answer was good, 0 if "
                         "it failed or timed out")
        self.state, self.interval_s = state, interval_s
        self._stop = threading.Event()
        self.publish()
        threading.Thread(target=self._run, name=f"remote-{kind}-metrics", daemon=True).start()

    def publish(self) -> None:
        for url, (tokens, up) in self.state().items():
            self.in_flight(**{self.kind: url}).set(tokens)
            self.up(**{self.kind: url}).set(1 if up else 0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.publish()
            except Exception:  # a failed update must not freeze the gauges for good
                log.exception("remote %s server gauges: an update failed; trying again in %s s", self.kind,
                              self.interval_s)

    def stop(self) -> None:
        self._stop.set()


class EngineMetrics:
    """The language engine: running and waiting sequences, KV blocks, prefix-cache lookups and hits (in
    prompt tokens, as vLLM counts them), preemptions, prefill and decode tokens, finished sequences by
    reason, and time to first token (from the request's arrival at the server)."""

    _COUNTERS = ("prefill_tokens", "decode_tokens", "prefix_queries", "prefix_hits", "preemptions")

    def __init__(self) -> None:
        self.running = Metric("triton_vlm_running_sequences", "Sequences admitted: prefilling or decoding")
        self.waiting = Metric("triton_vlm_waiting_sequences", "Requests accepted and waiting to be admitted")
        self.blocks_in_use = Metric("triton_vlm_kv_blocks_in_use", "KV-cache blocks held by sequences")
        self.blocks_total = Metric("triton_vlm_kv_blocks_total", "KV-cache blocks in the pool")
        self.counters = {
            "prefill_tokens": Metric("triton_vlm_prefill_tokens_total", "Prompt tokens computed (prefix-cache "
                                     "hits are not)", counter=True),
            "decode_tokens": Metric("triton_vlm_decode_tokens_total", "Tokens computed by decode steps",
                                    counter=True),
            "prefix_queries": Metric("triton_vlm_prefix_cache_queries_total", "Prompt tokens looked up in the "
                                     "prefix cache", counter=True),
            "prefix_hits": Metric("triton_vlm_prefix_cache_hits_total", "Prompt tokens found in the prefix cache",
                                  counter=True),
            "preemptions": Metric("triton_vlm_preemptions_total", "Sequences preempted (blocks given back, "
                                  "recomputed later) when the KV cache ran out", counter=True),
        }
        self.finished = Metric("triton_vlm_finished_sequences_total",
                               "Sequences the language model ended, by finish_reason", counter=True)
        self.embeds_in = Metric("triton_vlm_image_embeds_received_total", "Requests by the memory their "
                                "image embeddings arrived in at the language model (gpu: passed as GPU tensors)",
                                counter=True)
        self.ttft = Metric("triton_vlm_time_to_first_token_seconds", "From a request's arrival at the server "
                           "(preprocess) to its first token", buckets=TTFT_BUCKETS_S)
        self.kv_bytes = Metric("triton_vlm_kv_transfer_bytes_total", "Bytes of KV cache this server received "
                               "from prefill servers (E/P/D), by transport", counter=True)
        self.kv_seconds = Metric("triton_vlm_kv_transfer_seconds", "From a prefill server sending a prompt's KV to "
                                 "this server having it", buckets=KV_TRANSFER_BUCKETS_S)
        self.prefills = Metric("triton_vlm_prefills_total", "Prompts a decode server had prefilled, by where: "
                               "remote (a prefill server) or local (short, or every prefill server failed)",
                               counter=True)
        self._published = dict.fromkeys(self._COUNTERS, 0)  # the totals as last published (one thread publishes)

    def publish(self, stats) -> None:
        """`stats`: the engine's `EngineStats`."""
        self.running().set(stats.running)
        self.waiting().set(stats.waiting)
        self.blocks_in_use().set(stats.blocks_in_use)
        self.blocks_total().set(stats.blocks_total)
        for name, metric in self.counters.items():
            value = getattr(stats, name)
            if value > self._published[name]:  # never a negative increment: Triton refuses it, and the one
                metric().increment(value - self._published[name])  # time it did, the server aborted soon after
                self._published[name] = value

    def kv_transferred(self, nbytes: int, seconds: float, transport: str) -> None:
        """E/P/D: a prompt's KV came from a prefill server, by `transport` (grpc | nixl)."""
        self.kv_bytes(transport=transport).increment(nbytes)
        self.kv_seconds(transport=transport).observe(seconds)

    def prefilled_at(self, where: str) -> None:
        """E/P/D: a decode server's prompt was prefilled at `where` (remote | local)."""
        self.prefills(where=where).increment(1)

    def embeds_received(self, on_gpu: bool) -> None:
        self.embeds_in(memory="gpu" if on_gpu else "cpu").increment(1)

    def first_token(self, arrival_s: float) -> None:
        self.ttft().observe(max(0.0, time.time() - arrival_s))

    def ended(self, finish_reason: str) -> None:
        self.finished(finish_reason=finish_reason).increment(1)
