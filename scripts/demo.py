#!/usr/bin/env python3
"""Quick-start demo: nginx serves HTTPS on 127.0.0.1, curl talks to it, tlstap prints the plaintext.

Everything lives in a temporary directory and is stopped at the end; the only
traffic is on loopback.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

NGINX_CONF = """worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {d}/cert.pem;
        ssl_certificate_key {d}/key.pem;
        root {d}/www;
        location /echo {{ return 200 "ok\\n"; }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    tlstap = shutil.which("tlstap") or os.path.join(os.path.dirname(sys.executable), "tlstap")
    d = tempfile.mkdtemp(prefix="tlstap-demo-")
    port = free_port()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", f"{d}/key.pem", "-out", f"{d}/cert.pem"],
                   check=True, capture_output=True)
    os.chmod(d, 0o755)  # nginx's worker (nobody) must reach the docroot; the key stays 0600
    os.makedirs(f"{d}/www", mode=0o755)
    with open(f"{d}/www/index.html", "w") as f:
        f.write("<h1>hello from nginx over TLS</h1>\n")
    with open(f"{d}/nginx.conf", "w") as f:
        f.write(NGINX_CONF.format(d=d, port=port))
    nginx = subprocess.Popen(["nginx", "-c", f"{d}/nginx.conf"])
    tap = None
    try:
        time.sleep(0.5)
        print(f"== demo: nginx on https://127.0.0.1:{port}; starting `tlstap tls` (all processes)",
              file=sys.stderr, flush=True)
        tap = subprocess.Popen([tlstap, "tls"], stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        for line in tap.stderr:
            sys.stderr.write(line)
            if "ready" in line or time.monotonic() > deadline:
                break
        if tap.poll() is not None:
            return 1
        url = f"https://127.0.0.1:{port}"
        print(f"== curl -k {url}/ and a POST to {url}/echo", file=sys.stderr, flush=True)
        subprocess.run(["curl", "-sk", "--http1.1", f"{url}/", "-o", "/dev/null"], timeout=20)
        subprocess.run(["curl", "-sk", "--http1.1", "-d", "secret=42", f"{url}/echo", "-o", "/dev/null"], timeout=20)
        time.sleep(0.5)
    finally:
        if tap and tap.poll() is None:
            tap.send_signal(signal.SIGINT)
            sys.stderr.write(tap.stderr.read())
            tap.wait(timeout=20)
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(timeout=20)
        shutil.rmtree(d, ignore_errors=True)
    return tap.returncode if tap else 1


if __name__ == "__main__":
    sys.exit(main())
