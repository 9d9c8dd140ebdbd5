"""Prometheus metrics in a per-instance registry, and the one-event-per-request log."""

from __future__ import annotations

from typing import Any, cast

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import ILogObserver, Logger, formatEvent

from gitstratum.frontend.metrics import Metrics, log_request, record_request, repo_class_of
from gitstratum.storage.interfaces import Repository


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the rendered exposition, keyed by name and sorted labels."""
    body, _ = metrics.render()
    out = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_observe_request_counts_times_and_sizes() -> None:
    """One observation shows up in the request counter, the histogram and the byte counter."""
    m = Metrics()
    m.observe_request(
        service="git-upload-pack", repo_class="public", outcome="ok", seconds=0.2, nbytes=1000
    )
    m.observe_request(
        service="git-upload-pack", repo_class="public", outcome="ok", seconds=3.0, nbytes=24
    )
    m.observe_request(
        service="git-receive-pack", repo_class="private", outcome="denied", seconds=0.001, nbytes=0
    )
    got = samples(m)
    up = (("outcome", "ok"), ("repo_class", "public"), ("service", "git-upload-pack"))
    assert got[("gitstratum_requests_total", up)] == 2
    rp = (("outcome", "denied"), ("repo_class", "private"), ("service", "git-receive-pack"))
    assert got[("gitstratum_requests_total", rp)] == 1
    hist = (("repo_class", "public"), ("service", "git-upload-pack"))
    assert got[("gitstratum_request_duration_seconds_count", hist)] == 2
    assert got[("gitstratum_request_duration_seconds_sum", hist)] == pytest.approx(3.2)
    assert got[("gitstratum_request_duration_seconds_bucket", (("le", "0.25"), *hist))] == 1
    assert got[("gitstratum_request_duration_seconds_bucket", (("le", "5.0"), *hist))] == 2
    assert got[("gitstratum_response_bytes_total", (("service", "git-upload-pack"),))] == 1024
    assert ("gitstratum_response_bytes_total", (("service", "git-receive-pack"),)) not in got


def test_cache_and_push_counters_start_at_zero_and_count() -> None:
    """The pack-cache and push counters are exported from the start, at 0, and count up."""
    m = Metrics()
    got = samples(m)
    assert got[("gitstratum_pack_cache_hits_total", ())] == 0
    assert got[("gitstratum_pack_cache_misses_total", ())] == 0
    assert got[("gitstratum_push_objects_total", ())] == 0
    m.pack_cache_hit()
    m.pack_cache_hit()
    m.pack_cache_miss()
    m.objects_pushed(7)
    m.objects_pushed(0)
    got = samples(m)
    assert got[("gitstratum_pack_cache_hits_total", ())] == 2
    assert got[("gitstratum_pack_cache_misses_total", ())] == 1
    assert got[("gitstratum_push_objects_total", ())] == 7


def test_instances_do_not_share_state() -> None:
    """Each Metrics has its own registry, so many servers in one process count separately."""
    a, b = Metrics(), Metrics()
    assert a.registry is not b.registry
    a.pack_cache_hit()
    assert samples(a)[("gitstratum_pack_cache_hits_total", ())] == 1
    assert samples(b)[("gitstratum_pack_cache_hits_total", ())] == 0


def test_render_is_prometheus_text_format() -> None:
    """GET /metrics gets the Prometheus text content type and HELP/TYPE lines."""
    m = Metrics()
    m.observe_request(service="info-refs", repo_class="none", outcome="ok", seconds=0.0, nbytes=1)
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    assert "version=" in content_type
    text = body.decode("utf-8")
    assert "# TYPE gitstratum_requests_total counter" in text
    assert "# TYPE gitstratum_request_duration_seconds histogram" in text


def test_repo_class_must_be_a_known_class() -> None:
    """A repository name passed as repo_class is refused, so series cannot explode."""
    m = Metrics()
    with pytest.raises(ValueError, match="repo_class"):
        m.observe_request(service="x", repo_class="alice/proj", outcome="ok", seconds=0, nbytes=0)


def test_log_request_emits_one_structured_event() -> None:
    """A finished request is one log event whose fields are kept as keys and also rendered."""
    events: list[dict[str, Any]] = []
    log = Logger(namespace="test", observer=cast(ILogObserver, events.append))
    log_request(
        log,
        repo="alice/proj",
        service="git-upload-pack",
        user="alice",
        nbytes=4096,
        seconds=1.23456,
        outcome="ok",
        status=200,
    )
    assert len(events) == 1
    event = events[0]
    assert {k: event[k] for k in ("repo", "service", "user", "nbytes", "outcome", "status")} == {
        "repo": "alice/proj",
        "service": "git-upload-pack",
        "user": "alice",
        "nbytes": 4096,
        "outcome": "ok",
        "status": 200,
    }
    assert event["seconds"] == 1.23456
    assert formatEvent(event) == (
        "git-upload-pack alice/proj user=alice status=200 outcome=ok bytes=4096 seconds=1.235"
    )


def test_log_request_marks_anonymous_callers() -> None:
    """An anonymous caller is logged as '-', as in common log format."""
    events: list[dict[str, Any]] = []
    log_request(
        Logger(observer=cast(ILogObserver, events.append)),
        repo="org/pub",
        service="info-refs",
        user="",
        nbytes=0,
        seconds=0.0,
        outcome="ok",
        status=200,
    )
    assert events[0]["user"] == "-"
    assert "user=- " in formatEvent(events[0])


def record(metrics: Metrics | None, **fields: Any) -> dict[str, Any]:
    """The one event record_request logs for a request with *fields*."""
    events: list[dict[str, Any]] = []
    record_request(metrics, Logger(observer=cast(ILogObserver, events.append)), **fields)
    (event,) = events
    return event


REFUSED = {"repo": "alice/proj", "user": "bob", "status": 403, "outcome": "denied"}


def test_record_request_counts_and_logs_one_request() -> None:
    """record_request is observe_request plus log_request, with the same fields in both."""
    m = Metrics()
    event = record(
        m,
        service="upload-pack",
        repo="alice/proj",
        user="alice",
        status=0,
        outcome="ok",
        repo_class="private",
        seconds=0.5,
        nbytes=300,
    )
    got = samples(m)
    labels = (("outcome", "ok"), ("repo_class", "private"), ("service", "upload-pack"))
    assert got[("gitstratum_requests_total", labels)] == 1
    assert got[("gitstratum_response_bytes_total", (("service", "upload-pack"),))] == 300
    assert formatEvent(event) == (
        "upload-pack alice/proj user=alice status=0 outcome=ok bytes=300 seconds=0.500"
    )


def test_record_request_defaults_describe_a_refusal() -> None:
    """Without class, time or bytes the request counts as repo_class none, 0 s and 0 bytes."""
    m = Metrics()
    event = record(m, service="receive-pack", **REFUSED)
    got = samples(m)
    labels = (("outcome", "denied"), ("repo_class", "none"), ("service", "receive-pack"))
    assert got[("gitstratum_requests_total", labels)] == 1
    assert not any(name == "gitstratum_response_bytes_total" for name, _ in got)
    assert (event["nbytes"], event["seconds"], event["status"]) == (0, 0.0, 403)


def test_record_request_without_metrics_only_logs() -> None:
    """With metrics None the request still gets its log line (git:// refusals not counted)."""
    assert record(None, service="upload-archive", **REFUSED)["service"] == "upload-archive"


def test_record_request_logs_under_logged_as_and_counts_under_service() -> None:
    """logged_as names the service in the log line; the metric keeps the service label."""
    m = Metrics()
    event = record(m, service="upload-pack", logged_as="git-daemon upload-pack", **REFUSED)
    assert event["service"] == "git-daemon upload-pack"
    counted = {
        dict(labels)["service"]
        for name, labels in samples(m)
        if name == "gitstratum_requests_total"
    }
    assert counted == {"upload-pack"}


def test_repo_class_of_a_repository() -> None:
    """A public repository's requests are labelled public, any other's private."""
    assert repo_class_of(Repository(1, "alice/open", public=True)) == "public"
    assert repo_class_of(Repository(2, "alice/proj")) == "private"
