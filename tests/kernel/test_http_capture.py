"""Decoded HTTP in text and JSON mode, against real peers: curl and nginx (HTTP/1.1 and HTTP/2).

Oracles: the files nginx served, the request headers curl says it sent (-v) and the response
headers it received (-D).
"""
from __future__ import annotations

import base64
import gzip
import importlib.util
import json
import os
import subprocess
import sys

from tests.conftest import need
from tests.peers import NginxServer, PySSLServer

from .conftest import client
from .tap import Tap


def body_of(m: dict, decoded: bool = False) -> bytes:
    b = m["decoded_body"] if decoded else m["body"]
    return base64.b64decode(b["data"]) if b["encoding"] == "base64" else b["data"].encode()


def curl(args: list[str], tmp_path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sSk", "-v", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path)


def curl_request_headers(stderr: str) -> list[list[str]]:
    """The header lines curl -v says it sent (HTTP/1.1: '> Name: value')."""
    out = []
    for ln in stderr.splitlines():
        if ln.startswith("> ") and ": " in ln:
            k, v = ln[2:].split(": ", 1)
            out.append([k, v.rstrip("\r")])
    return out


def test_http1_gzip_chunked_and_a_5mib_body(tmp_path, cert):
    page = b"<html>" + b"compressible text " * 4000 + b"</html>\n"
    big = os.urandom(5 << 20)
    with NginxServer(*cert, {"page.html": page, "big.bin": big}, gzip=True) as srv:
        w = srv.worker_pids()[0]
        with Tap(tmp_path, "--pid", str(w), "--max-body", "6M", raw=False) as tap:
            r = curl(["--http1.1", "--compressed", "-H", "X-Trace: tlstap-1", "-D", "h1.txt",
                      srv.url("page.html"), "-o", "page.out", srv.url("big.bin"), "-o", "big.out"], tmp_path)
            assert r.returncode == 0, r.stderr
            srv.wait_logged(2)
            tap.stop()
    ex = tap.http()
    assert [e["request"]["target"] for e in ex] == ["/page.html", "/big.bin"]
    assert all(e["role"] == "server" and e["proto"] == "HTTP/1.1" and e["latency_ns"] > 0 for e in ex)
    page_ex, big_ex = ex
    # the request as curl sent it, header for header
    sent = curl_request_headers(r.stderr)
    assert page_ex["request"]["headers"] == sent[:len(page_ex["request"]["headers"])]
    assert ["X-Trace", "tlstap-1"] in page_ex["request"]["headers"]
    # gzip + chunked: raw body kept, decoded body equal to the file
    resp = page_ex["response"]
    hdrs = {k.lower(): v for k, v in resp["headers"]}
    assert hdrs["content-encoding"] == "gzip" and hdrs["transfer-encoding"] == "chunked"
    assert body_of(resp, decoded=True) == page
    assert gzip.decompress(body_of(resp)) == page
    # the response headers as curl received them (-D)
    got = (tmp_path / "h1.txt").read_bytes().decode().split("\r\n\r\n")[0].split("\r\n")[1:]
    assert [f"{k}: {v}" for k, v in resp["headers"]] == got
    # 5 MiB, byte for byte
    big_resp = big_ex["response"]      # gzip_types * compresses it too (larger: random bytes)
    assert not big_resp["body_truncated"] and big_resp["complete"]
    assert body_of(big_resp, decoded=True) == big
    assert (tmp_path / "big.out").read_bytes() == big


def test_http1_keepalive_1000_requests_paired(tmp_path, cert):
    files = {f"f{i}": f"body-{i}\n".encode() for i in range(10)}
    urls = [f"f{i % 10}?n={i}" for i in range(1000)]
    with NginxServer(*cert, files) as srv:
        w = srv.worker_pids()[0]
        cfg = tmp_path / "urls.cfg"
        cfg.write_text("".join(f'url = "{srv.url(u)}"\noutput = "/dev/null"\n' for u in urls))
        with Tap(tmp_path, "--pid", str(w), raw=False) as tap:
            r = curl(["--http1.1", "-K", str(cfg)], tmp_path)
            assert r.returncode == 0, r.stderr[-2000:]
            srv.wait_logged(1000)
            tap.stop()
    ex = tap.http()
    assert len(ex) == 1000
    assert len({(e["local"]["port"], e["remote"]["port"]) for e in ex}) == 1        # one connection
    for u, e in zip(urls, ex):
        assert e["request"]["target"] == "/" + u
        assert e["response"]["status"] == 200
        assert body_of(e["response"]) == files[u.split("?")[0]]


def test_http1_8_connections_at_once_all_paired(tmp_path, cert):
    """8 curl processes at once, 25 keep-alive requests each: 8 connections whose records
    interleave. Each must keep its own HTTP state (the wire source names no SSL*: its
    connections must still be told apart), so every exchange comes out paired."""
    files = {f"g{i}": f"page {i}\n".encode() * (i + 1) for i in range(5)}
    with NginxServer(*cert, files) as srv:
        w = srv.worker_pids()[0]
        with Tap(tmp_path, "--pid", str(w), raw=False) as tap:
            procs = []
            for c in range(8):
                cfg = tmp_path / f"c{c}.cfg"
                cfg.write_text("".join(f'url = "{srv.url(f"g{i % 5}?c={c}&n={i}")}"\noutput = "/dev/null"\n'
                                       for i in range(25)))
                procs.append(subprocess.Popen(["curl", "-sSk", "--http1.1", "-K", str(cfg)], cwd=tmp_path,
                                              stderr=subprocess.PIPE))
            for p in procs:
                assert p.wait(120) == 0, p.stderr.read()
            srv.wait_logged(200)
            tap.stop()
    ex = tap.http()
    assert sorted(e["request"]["target"] for e in ex) == sorted(
        f"/g{i % 5}?c={c}&n={i}" for c in range(8) for i in range(25))
    assert len({(e["remote"]["port"]) for e in ex}) == 8
    for e in ex:
        assert e["response"]["status"] == 200
        assert body_of(e["response"]) == files[e["request"]["target"][1:].split("?")[0]]


def test_http2_100_concurrent_streams(tmp_path, cert):
    files = {f"s{i}": os.urandom(1000 + 37 * i) for i in range(100)}
    with NginxServer(*cert, files, http2=True) as srv:
        w = srv.worker_pids()[0]
        args = ["--http2", "--parallel", "--parallel-max", "100"]   # multiplexed on one connection
        for name in files:
            args += [srv.url(name), "-o", f"{name}.out"]
        with Tap(tmp_path, "--pid", str(w), "--format", "text", raw=False) as text_tap, \
                Tap(tmp_path, "--pid", str(w), raw=False) as tap:
            r = curl(args, tmp_path)
            assert r.returncode == 0, r.stderr[-2000:]
            srv.wait_logged(100)
            tap.stop()
            text_tap.stop()
    ex = tap.http()
    assert len(ex) == 100 and {e["proto"] for e in ex} == {"HTTP/2"}
    assert len({e["stream"] for e in ex}) == 100
    for e in ex:
        name = e["request"]["target"].lstrip("/")
        assert body_of(e["response"]) == files[name] == (tmp_path / f"{name}.out").read_bytes()
    frames = [r for r in tap.records() if r["type"] == "frame"]
    assert any(f["frame"] == "SETTINGS" for f in frames)
    text = open(text_tap.out, encoding="utf-8", errors="replace").read()
    assert text.count("> GET /s") == 100 and "> GET /s0 HTTP/2\n" in text   # one exchange each


def test_raw_and_headers_only(tmp_path, cert):
    with NginxServer(*cert, {"x": b"X" * 3000}) as srv:
        w = srv.worker_pids()[0]
        with Tap(tmp_path, "--pid", str(w), raw=True) as raw, \
                Tap(tmp_path, "--pid", str(w), "--headers-only", raw=False) as hdr:
            assert curl(["--http1.1", srv.url("x"), "-o", "/dev/null"], tmp_path).returncode == 0
            srv.wait_logged(1)
            raw.stop()
            hdr.stop()
    assert not raw.http() and b"X" * 3000 in b"".join(
        base64.b64decode(d["data"]) if d["encoding"] == "base64" else d["data"].encode() for d in raw.data())
    (e,) = hdr.http()
    assert "body" not in e["response"] and e["response"]["body_len"] == 3000


def test_not_http_falls_back_to_raw_calls(tmp_path, cert):
    """A TLS connection that is not HTTP: its calls come through as data records, unchanged."""
    payload = os.urandom(2000)
    with PySSLServer(*cert) as srv:
        cl = client(srv, [payload])
        with cl, Tap(tmp_path, "--pid", str(cl.pid), raw=False) as tap:
            (t,) = cl.go().wait()
            tap.stop()
    recs = tap.records()
    assert not [r for r in recs if r["type"] == "http"]
    sent = b"".join(base64.b64decode(r["data"]) if r["encoding"] == "base64" else r["data"].encode()
                    for r in recs if r["type"] == "data" and r["dir"] == "write")
    assert sent == t.sent


HTTPX_CLIENT = r"""
import asyncio, json, sys, httpx
async def main(urls):
    async with httpx.AsyncClient(http2=True, verify=False) as c:
        rs = await asyncio.gather(*(c.get(u, headers={"x-client": "httpx"}) for u in urls))
    print(json.dumps([{"url": str(r.url), "version": r.http_version, "status": r.status_code,
                       "body": r.content.hex(), "headers": [[k.decode(), v.decode()] for k, v in r.headers.raw]}
                      for r in rs]))
asyncio.run(main(sys.argv[1:]))
"""


def test_httpx_http2_client_against_nginx(tmp_path, cert):
    need(importlib.util.find_spec("httpx") and importlib.util.find_spec("h2"), "httpx and h2 are not installed (pip install .[test])")
    files = {f"h{i}": os.urandom(5000 * (i + 1)) for i in range(5)}
    with NginxServer(*cert, files, http2=True) as srv:
        w = srv.worker_pids()[0]
        with Tap(tmp_path, "--pid", str(w), raw=False) as tap:
            p = subprocess.run([os.environ.get("PYTHON", sys.executable), "-c", HTTPX_CLIENT,
                                *(srv.url(n) for n in files)], capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, p.stderr
            srv.wait_logged(len(files))
            tap.stop()
    got = json.loads(p.stdout)
    ex = {e["request"]["target"]: e for e in tap.http()}
    assert len(ex) == len(files)
    for r in got:
        e = ex["/" + r["url"].rsplit("/", 1)[1]]
        assert r["version"] == "HTTP/2" and e["proto"] == "HTTP/2"
        assert ["x-client", "httpx"] in e["request"]["headers"]
        assert e["response"]["status"] == r["status"] == 200
        assert body_of(e["response"]) == bytes.fromhex(r["body"])
        assert e["response"]["headers"] == r["headers"]     # hpack-decoded == what httpx received
