"""NATS JetStream: the export target (parse_url, check_target) and the publisher thread.

The publisher runs an asyncio loop with nats-py in a thread of its own (in the decoder
process), so the capture never waits for the network: it takes messages from an
ExportQueue, keeps up to WINDOW publishes in flight (one ack wait per message could not keep
up with tens of thousands of events a second), and on a missing or failed ack gives every
unacknowledged message back to the queue's head and retries after a backoff. Each message
carries a Nats-Msg-Id header: a retry of a message the stream already holds is acknowledged
as a duplicate and not stored again (within the stream's duplicate window), which makes the
retries exactly-once in the stream.

Acks come on one subscription (a reply subject per message under one inbox), not a future
per request: nats-py's request() costs a subscription lookup, a future and a timer each.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable

from .queue import ExportQueue

#: publishes waiting for their ack at once
WINDOW = 256
#: a publish unacknowledged this long is given back and retried (a cluster's leader election
#: takes about this long; a retry sooner would only be a duplicate)
ACK_TIMEOUT_S = 2.0
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.1, 2.0
DEFAULT_PORT = 4222
#: why the publisher dropped a message (beside the queue's reasons)
TOO_LARGE = "larger than the server's max_payload"

#: bytes of an HPUB's header block beside the id ("NATS/1.0\r\nNats-Msg-Id: ...\r\n\r\n")
_HEADER_OVERHEAD = 32
_SUBJECT_TOKEN = re.compile(r"[^\s.*>]+")


class ExportTargetError(Exception):
    """A bad or unusable export target; str() is one line naming the URL."""


@dataclass(frozen=True)
class Target:
    servers: tuple[str, ...]     # "nats://[user:pass@]127.0.0.1:4222", ...
    subject: str
    url: str                     # as given, without credentials: for messages


def parse_url(url: str) -> Target:
    """`nats://[USER:PASS@]HOST[:PORT][,HOST[:PORT]...]/SUBJECT` (port 4222 by default)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme != "nats":
        raise ExportTargetError(f"export target {url!r}: expected nats://HOST:PORT/SUBJECT")
    hosts, _, subject = rest.partition("/")
    cred, at, hosts = hosts.rpartition("@")
    shown = f"nats://{hosts}/{subject}"
    if not subject:
        raise ExportTargetError(f"export target {shown}: no subject (nats://HOST:PORT/SUBJECT)")
    if not all(_SUBJECT_TOKEN.fullmatch(t) for t in subject.split(".")):
        raise ExportTargetError(f"export target {shown}: {subject!r} is not a subject to publish to "
                                f"(dot-separated tokens, no spaces, no wildcards * or >)")
    servers = []
    for hp in hosts.split(","):
        host, port = hp, str(DEFAULT_PORT)
        m = re.fullmatch(r"(\[[^\]]+\]|[^:\[\]]+)(?::([^:]*))?", hp)
        if m is None or not m.group(1).strip("[]"):
            raise ExportTargetError(f"export target {shown}: bad host {hp!r}")
        host, port = m.group(1), m.group(2) if m.group(2) is not None else port
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ExportTargetError(f"export target {shown}: bad port {port!r}")
        servers.append(f"nats://{cred + at}{host}:{int(port)}")
    return Target(tuple(servers), subject, shown)


def _go_duration(s: float) -> str:
    """Seconds as Go prints a time.Duration, as the nats CLI shows the duplicate window."""
    h, rest = divmod(round(s), 3600)
    m, sec = divmod(rest, 60)
    return (f"{h}h{m}m{sec}s" if h else f"{m}m{sec}s" if m else f"{sec}s")


def _why(e: BaseException) -> str:
    """An error in a few words ("Connection refused", not asyncio's "Connect call failed (...)")."""
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    return str(e) or type(e).__name__


def _servers_text(t: Target) -> str:
    return ", ".join(urllib.parse.urlsplit(s).netloc.rpartition("@")[2] for s in t.servers)


def check_target(t: Target, timeout: float = 3.0) -> str:
    """Connect and find the stream holding t.subject: its one-line description, or
    ExportTargetError saying what to do."""
    return asyncio.run(_check(t, timeout))


async def _check(t: Target, timeout: float) -> str:
    import nats
    from nats.js import errors as jse
    errs: list[Exception] = []

    async def note(e):
        errs.append(e)
    try:
        # max_reconnect_attempts=1: each server tried twice (0 would be "forever" in nats-py)
        nc = await asyncio.wait_for(nats.connect(
            list(t.servers), allow_reconnect=False, connect_timeout=max(1, int(timeout)),
            max_reconnect_attempts=1, reconnect_time_wait=0.1, error_cb=note, name="tlstap"), timeout)
    except Exception as e:
        why = _why(errs[-1] if errs else e)
        raise ExportTargetError(f"export target {t.url}: cannot connect to {_servers_text(t)} ({why}); "
                                f"is nats-server running there?") from None
    try:
        js = nc.jetstream(timeout=timeout)
        try:
            name = await js.find_stream_name_by_subject(t.subject)
        except jse.NotFoundError:
            raise ExportTargetError(
                f"export target {t.url}: no JetStream stream holds subject {t.subject!r}; create one, e.g. "
                f"`nats stream add EVENTS --subjects '{t.subject}' --storage file --replicas 1 "
                f"--dupe-window 2m --defaults`") from None
        except (jse.ServiceUnavailableError, nats.errors.NoRespondersError, nats.errors.TimeoutError):
            raise ExportTargetError(f"export target {t.url}: JetStream does not answer on this server "
                                    f"(start nats-server with -js, or enable jetstream in its "
                                    f"configuration)") from None
        info = await js.stream_info(name)
        c = info.config
        storage = getattr(c.storage, "value", c.storage) or "file"
        reps = c.num_replicas or 1
        return (f"stream {name} ({storage}, {reps} replica{'s' if reps != 1 else ''}, "
                f"duplicate window {_go_duration(c.duplicate_window or 120)})")
    except ExportTargetError:
        raise
    except Exception as e:
        raise ExportTargetError(f"export target {t.url}: {str(e) or type(e).__name__}") from None
    finally:
        try:
            await asyncio.wait_for(nc.close(), timeout)
        except Exception:
            pass


class Publisher:
    """The thread that moves messages from `queue` to the stream. start(), wake() (cheap, any
    thread: something was queued), stop(timeout) (sends what it can in that time, then ends;
    what is left stays in the queue), and the counters."""

    def __init__(self, target: Target, queue: ExportQueue, status: Callable[[str], None],
                 window: int = WINDOW, ack_timeout: float = ACK_TIMEOUT_S):
        self.target = target
        self.queue = queue
        self.status = status
        self.window = window
        self.ack_timeout = ack_timeout
        self.published = self.acked = self.duplicates = 0
        self.dropped: dict[str, int] = {}
        self.idle = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kick: asyncio.Event | None = None
        self._ready = threading.Event()
        self._stop_at: float | None = None
        self._inflight: dict[str, tuple[tuple[bytes, bytes], float]] = {}   # reply token -> item
        self._token = 0
        self._done: list[tuple[bytes, bytes]] = []     # acknowledged, not yet told to the queue
        self._backoff = 0.0
        self._retry_at = 0.0
        self._trouble: str | None = None      # what is wrong now, told once
        self._thread = threading.Thread(target=self._main, name="tlstap-export", daemon=True)
        self._cpu_end: float | None = None
        self._closing = False

    # ---- the other threads' side ---------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(5)

    def wake(self) -> None:
        """Called after a put: only an idle publisher needs the (costly) cross-thread call."""
        if self.idle and self._loop is not None:
            self.idle = False
            try:
                self._loop.call_soon_threadsafe(self._kick.set)
            except RuntimeError:          # the loop has ended
                pass

    def stop(self, timeout: float) -> None:
        if self._loop is not None and self._thread.is_alive():
            deadline = time.monotonic() + timeout
            try:
                self._loop.call_soon_threadsafe(self._begin_stop, deadline)
            except RuntimeError:
                pass
            self._thread.join(timeout + 3)

    def cpu_s(self) -> float:
        if self._cpu_end is not None:
            return self._cpu_end
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(self._thread.ident))
        except (OSError, TypeError):
            return 0.0

    # ---- the publisher thread ----------------------------------------------------------

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except Exception as e:      # noqa: BLE001 - a bug here must not pass silently: the queue fills
            self.status(f"export: the publisher stopped: {type(e).__name__}: {e}; what is queued is dropped "
                        f"at the end, counted")
        finally:
            self._cpu_end = time.thread_time()
            self._ready.set()

    def _begin_stop(self, deadline: float) -> None:
        self._stop_at = deadline
        self._kick.set()

    def _tell(self, trouble: str | None, line: str) -> None:
        """Problems once, while they last; recovery once."""
        if trouble != self._trouble:
            self._trouble = trouble
            self.status(line)

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._kick = asyncio.Event()
        self._ready.set()
        nc = await self._connect()
        if nc is None:
            return
        try:
            inbox = nc.new_inbox()
            await nc.subscribe(inbox + ".*", cb=self._on_ack)
            await self._pump(nc, inbox + ".")
        finally:
            self.queue.done(self._done)
            self._done = []
            self._closing = True
            try:
                await asyncio.wait_for(nc.close(), 1.0)
            except Exception:
                pass

    def _stopping(self) -> bool:
        return self._stop_at is not None and (time.monotonic() >= self._stop_at
                                              or (not self._inflight and not len(self.queue)))

    async def _connect(self):
        import nats
        t = self.target

        async def disconnected():
            if self._closing:
                return
            self._fail(None)       # acks of what was sent may never come: resend after reconnecting
            self._tell("lost", f"export: lost the connection to {t.url}; queueing meanwhile, reconnecting")

        async def reconnected():
            self._tell(None, f"export: reconnected to {t.url}")

        async def error(e):
            if not connecting.done():
                self._tell("unreachable", f"export: cannot reach {t.url} ({_why(e)}); queueing meanwhile, retrying")

        # nats-py retries the first connection itself (max_reconnect_attempts=-1): wait for it
        # or for stop()
        # pending_size=0: no publish buffered by nats-py while it reconnects (it would send those
        # first on reconnecting, ahead of the retries this publisher puts back at the head)
        connecting = asyncio.ensure_future(nats.connect(
            list(t.servers), name="tlstap", allow_reconnect=True, max_reconnect_attempts=-1, pending_size=0,
            reconnect_time_wait=0.5, connect_timeout=2, ping_interval=5, max_outstanding_pings=2,
            error_cb=error, disconnected_cb=disconnected, reconnected_cb=reconnected,
            skip_subject_validation=True))
        while not connecting.done():
            self._kick.clear()
            kicked = asyncio.ensure_future(self._kick.wait())
            await asyncio.wait([connecting, kicked], timeout=0.1, return_when=asyncio.FIRST_COMPLETED)
            kicked.cancel()
            if not connecting.done() and self._stopping():
                connecting.cancel()
                try:
                    await connecting
                except BaseException:
                    pass
                return None
        try:
            nc = connecting.result()
        except Exception as e:
            self._tell("unreachable", f"export: cannot connect to {t.url} ({_why(e)})")
            return None
        if self._trouble == "unreachable":
            self._tell(None, f"export: connected to {t.url}")
        return nc

    async def _pump(self, nc, prefix: str) -> None:
        q, subject, inflight = self.queue, self.target.subject, self._inflight
        while not self._stopping():
            if self._done:
                q.done(self._done)
                self._done = []
            now = time.monotonic()
            if inflight:
                _, sent = next(iter(inflight.values()))
                if now - sent > self.ack_timeout:
                    self._fail("no acknowledgement")
            room = self.window - len(inflight)
            if now >= self._retry_at and nc.is_connected and room > 0:
                items = q.take(room)
                # every taken item is in _inflight before the first await: a give-back (an ack
                # failing, the connection lost) then always returns the oldest items, in order
                batch = []
                for item in items:
                    # the server counts the headers too, and closes the connection beyond it
                    if len(item[1]) + len(item[0]) + _HEADER_OVERHEAD > nc.max_payload:
                        q.done([item])
                        self.dropped[TOO_LARGE] = self.dropped.get(TOO_LARGE, 0) + 1
                        continue
                    self._token += 1
                    tok = str(self._token)
                    inflight[tok] = (item, now)
                    batch.append((tok, item))
                for tok, item in batch:
                    if tok not in inflight:     # given back meanwhile: sent again later
                        break
                    try:
                        await nc.publish(subject, item[1], reply=prefix + tok,
                                         headers={"Nats-Msg-Id": item[0].decode()})
                    except Exception as e:
                        self._fail(_why(e))
                        break
                    self.published += 1
                if items:
                    await asyncio.sleep(0)      # let the acks in
                    continue
            # nothing to do until an ack, a put, a retry time or an ack timeout
            self._kick.clear()
            self.idle = not len(q)
            if self.idle and len(q):            # a put between the test and the flag
                self.idle = False
                continue
            wait = 0.05
            if now < self._retry_at:
                wait = min(wait, self._retry_at - now)
            try:
                await asyncio.wait_for(self._kick.wait(), wait)
            except asyncio.TimeoutError:
                pass
            self.idle = False

    def _on_ack_sync(self, tok: str, data: bytes, status: str | None) -> None:
        entry = self._inflight.get(tok)
        if entry is None:                       # given back already: its retry counts
            return
        if status is not None:                  # 503: no stream answers (a leader election...)
            self._fail(f"no stream answers (status {status})")
            return
        if data.startswith(b'{"stream":') and b'"error"' not in data and b'"duplicate"' not in data:
            dup = False                         # the common PubAck, without the cost of json
        else:
            try:
                ack = json.loads(data)
            except ValueError:
                ack = {"error": {"description": f"unreadable ack {data[:40]!r}"}}
            if "error" in ack:
                self._fail(ack["error"].get("description", "error"))
                return
            dup = bool(ack.get("duplicate"))
        del self._inflight[tok]
        self.acked += 1
        self.duplicates += dup
        self._done.append(entry[0])             # the queue learns in _pump: one lock per batch
        if self._backoff:
            self._backoff = 0.0
            self._tell(None, f"export: {self.target.url} acknowledges again")
        if len(self._inflight) < self.window // 2:
            self._kick.set()

    async def _on_ack(self, msg) -> None:
        st = msg.headers.get("Status") if msg.headers else None
        self._on_ack_sync(msg.subject.rpartition(".")[2], msg.data, st)

    def _fail(self, why: str | None) -> None:
        """Every unacknowledged message goes back to the queue's head, in order, and sending
        pauses (doubling up to BACKOFF_MAX_S): a retry resends them with the same ids."""
        items = [item for item, _ in self._inflight.values()]
        self._inflight.clear()
        self.queue.give_back(items)
        self._backoff = min(max(self._backoff * 2, BACKOFF_MIN_S), BACKOFF_MAX_S)
        self._retry_at = time.monotonic() + self._backoff
        if why is not None:
            self._tell("fail", f"export: {self.target.url}: {why}; retrying, queueing meanwhile")
