"""--redact on the local output, against real peers (nginx and curl): credential header values
and query parameters REDACTED, every other header as curl sent it, bodies left out unless
--max-body; without --redact the same capture is complete. And the flags' one-line errors."""
from __future__ import annotations

import pytest

from tests.peers import NginxServer

from .tap import Tap, run_tlstap
from .test_cli_errors import assert_one_line_error
from .test_http_capture import body_of, curl, curl_request_headers

SECRET_HEADERS = ["Authorization: Bearer tok-abc.def", "Cookie: sid=s-123; theme=dark", "X-Api-Key: key-9",
                  "X-Trace: keep-me"]


def _exchange(tap: Tap) -> dict:
    (ex,) = [e for e in tap.http() if e["request"]["target"].startswith("/page.html")]
    return ex


def _capture(tmp_path, cert, *flags: str):
    page = b"page body: not a credential\n" * 10
    with NginxServer(*cert, {"page.html": page}) as srv:
        with Tap(tmp_path, "--pid", str(srv.worker_pids()[0]), *flags, raw=False) as tap:
            args = ["--http1.1"]
            for h in SECRET_HEADERS:
                args += ["-H", h]
            r = curl(args + [srv.url("page.html") + "?access_token=at-1&n=2&mine=m-1", "-o", "page.out"], tmp_path)
            assert r.returncode == 0, r.stderr
            srv.wait_logged(1)
            tap.stop()
    return _exchange(tap), curl_request_headers(r.stderr), page


def test_redact_local_output(tmp_path, cert):
    ex, sent, page = _capture(tmp_path, cert, "--redact", "--redact-query", "mine")
    req = ex["request"]
    assert req["target"] == "/page.html?access_token=REDACTED&n=2&mine=REDACTED"
    want = [[k, "REDACTED" if k.lower() in ("authorization", "cookie", "x-api-key") else v] for k, v in sent]
    assert req["headers"] == want[:len(req["headers"])] and ["X-Trace", "keep-me"] in req["headers"]
    # bodies left out (their length kept), as the exporter does
    assert "body" not in ex["response"] and ex["response"]["body_len"] == len(page)


def test_redact_keeps_bodies_with_max_body_and_without_redact_all_is_there(tmp_path, cert):
    ex, _, page = _capture(tmp_path, cert, "--redact", "--max-body", "64K")
    assert body_of(ex["response"]) == page
    assert dict(ex["request"]["headers"])["Authorization"] == "REDACTED"
    ex, sent, _ = _capture(tmp_path, cert)
    assert ex["request"]["headers"] == sent[:len(ex["request"]["headers"])]
    assert ex["request"]["target"] == "/page.html?access_token=at-1&n=2&mine=m-1"


@pytest.mark.parametrize("argv,needles", [
    (["-m", "keylog", "--redact"], ["--redact", "text output"]),
    (["--redact-query", "q"], ["--redact-query", "--export"]),
    (["--metrics-peer"], ["--metrics-peer", "--metrics-addr"]),
    (["--export-bodies", "1K"], ["--export-bodies", "--export"]),
    (["--metrics-addr", "127.0.0.1:9464", "--hex"], ["--hex", "text output"]),
])
def test_flags_of_outputs_not_written_are_refused(argv, needles):
    assert_one_line_error(run_tlstap("tls", *argv), *needles)
