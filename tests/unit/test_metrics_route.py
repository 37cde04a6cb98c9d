"""Route templating for the http_route label: ids out, names kept, user patterns first, the
query never in a label."""
from __future__ import annotations

import uuid

import pytest

from tlstap.errors import UsageError
from tlstap.metrics.route import MAX_DEPTH, RouteTemplater


@pytest.mark.parametrize("target,route", [
    ("/users/42", "/users/{id}"),
    ("/users/42/posts/7", "/users/{id}/posts/{id}"),
    (f"/orders/{uuid.uuid4()}", "/orders/{id}"),
    (f"/orders/{uuid.uuid4().hex}", "/orders/{id}"),                       # a UUID without dashes
    ("/commits/3f2a9b8c1d0e", "/commits/{id}"),                              # hex with digits
    ("/blobs/a1b2c3d4e5f60718293a4b5c6d7e8f9012345678", "/blobs/{id}"),      # a SHA-1
    ("/t/aGVsbG8gd29ybGQxMjM0NTY3", "/t/{id}"),                              # base64-ish token
    ("/reports/2024-01-15/daily", "/reports/{id}/daily"),                    # a date
    ("/files/12345.json", "/files/{id}.json"),                               # an id with an extension
    ("/u/alice@example.com", "/u/{id}"),
    ("/s/" + "x" * 41, "/s/{id}"),                                           # too long for a name
    ("/api/v2/items", "/api/v2/items"),                                      # names stay
    ("/deadbeef", "/deadbeef"), ("/user1", "/user1"), ("/", "/"),
    ("/search?q=secret&token=abc", "/search"),                               # the query never
    ("/page#section-2", "/page"),
    ("https://example.com:8443/a/99?x=1", "/a/{id}"),                        # absolute-form
    ("*", "*"), ("", "_unknown"), (None, "_unknown"), ("example.com:443", "_unknown"),
])
def test_templating(target, route):
    assert RouteTemplater().route(target) == route


def test_depth_is_bounded():
    deep = "/" + "/".join(f"n{i}x" for i in range(MAX_DEPTH + 3))
    got = RouteTemplater().route(deep)
    assert got.endswith("/*") and got.count("/") == MAX_DEPTH + 1


def test_no_segment_that_looks_like_an_id_survives():
    """Whatever the path, a numeric or UUID segment is never in the route."""
    r = RouteTemplater()
    for n in (0, 7, 123456789012):
        for shape in ("/a/{}", "/{}/b", "/a/{}/c/{}"):
            path = shape.format(*([n] * shape.count("{}")))
            assert str(n) not in r.route(path).replace("{id}", "")
    u = str(uuid.uuid4())
    assert u not in r.route(f"/x/{u}/y")


def test_user_patterns_win_in_order():
    r = RouteTemplater(["/users/{user}/posts", "/static/*", "/users/*"])
    assert r.route("/users/alice/posts?page=2") == "/users/{user}/posts"
    assert r.route("/users/alice/likes") == "/users/*"                 # the first pattern does not match
    assert r.route("/static/css/site.css") == "/static/*"
    assert r.route("/users//posts") == "/users/*"                      # {user} needs a segment
    assert r.route("/other/42") == "/other/{id}"                       # no pattern: templated


@pytest.mark.parametrize("bad", ["users/{id}", "/a?b=1", "/a#b"])
def test_a_bad_pattern_is_a_usage_error(bad):
    with pytest.raises(UsageError, match="--metrics-route"):
        RouteTemplater([bad])
