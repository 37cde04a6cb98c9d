// HTTPS client peer for tests/peers/node.py. Node links OpenSSL statically, so its TLS
// calls never go through libssl.so -- a tracer must find them in the node binary itself.
// usage: node [--tls-keylog=FILE] node_client.js CONFIG_JSON
//        (url, method, bodyFile, out, timeoutMs; optional minVersion, maxVersion, ciphers)
// Prints READY, waits for a line on stdin (lets a tracer attach to this pid), then does
// one request and writes {local, remote, status, headers, body(base64), protocol, cipher,
// error} to `out`. --tls-keylog is node's own option: it appends the lines OpenSSL's keylog
// callback produces to FILE.
'use strict';
const https = require('https');
const fs = require('fs');

const cfg = JSON.parse(process.argv[2]);
const body = cfg.bodyFile ? fs.readFileSync(cfg.bodyFile) : Buffer.alloc(0);
const result = { local: null, remote: null, status: null, headers: null, body: '', protocol: null,
                 cipher: null, error: null };
let done = false;

function finish(err) {
  if (done) return;
  done = true;
  if (err) result.error = String(err && err.stack || err);
  fs.writeFileSync(cfg.out + '.tmp', JSON.stringify(result));
  fs.renameSync(cfg.out + '.tmp', cfg.out); // python never reads a partial file
  process.exitCode = err ? 1 : 0;
}

function run() {
  const headers = {};
  if (body.length || cfg.method !== 'GET') headers['Content-Length'] = body.length; // no chunking
  const tlsOpts = {};
  for (const k of ['minVersion', 'maxVersion', 'ciphers']) if (cfg[k]) tlsOpts[k] = cfg[k];
  const req = https.request(cfg.url, {
    method: cfg.method, headers, rejectUnauthorized: false,
    agent: new https.Agent({ keepAlive: false }), ...tlsOpts,
  }, (res) => {
    const s = res.socket;
    result.local = [s.localAddress, s.localPort];
    result.remote = [s.remoteAddress, s.remotePort];
    result.protocol = s.getProtocol();
    result.cipher = (s.getCipher() || {}).standardName || null;
    result.status = res.statusCode;
    result.headers = res.headers;
    const chunks = [];
    res.on('data', (c) => chunks.push(c));
    res.on('end', () => { result.body = Buffer.concat(chunks).toString('base64'); finish(null); });
    res.on('error', finish);
  });
  req.setTimeout(cfg.timeoutMs, () => req.destroy(new Error('timeout')));
  req.on('error', finish);
  req.end(body);
}

process.stdout.write('READY\n');
let buf = '';
process.stdin.on('data', (d) => {
  buf += d;
  if (buf.includes('\n')) { process.stdin.destroy(); run(); }
});
process.stdin.on('end', () => { if (!buf.includes('\n')) process.exit(3); }); // test gave up
