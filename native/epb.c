/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * pcapng Enhanced Packet Blocks from a piece of the packet ring buffer, for
 * -m pcapng (src/tlstap/pcapng_mode.py, loaded through ctypes by native.py).
 *
 * Why C: at 64 KiB responses nginx puts ~1 GB/s and ~60k packets a second
 * through the ring on two shared CPUs. The same loop in Python costs ~2 us of
 * interpreter per packet, a tenth of a CPU that the traced server pays for;
 * here it is one memcpy of the packet and a table lookup. No library encodes
 * pcapng from our record layout (python-pcapng and dpkt build objects per
 * block, see sinks/pcapng.py).
 *
 * What stays in Python, on purpose: the text of each block's options (the
 * process comment, the direction flag). Python encodes the trailer of a
 * (sender, receiver, direction, padding) combination once, hands it over with
 * epb_add_trailer(), and this file copies it; when it meets a combination it
 * does not know yet it stops and says which record, so pcapng.py stays the
 * one place that spells the options.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <linux/types.h>
#include <linux/bpf.h>     /* BPF_RINGBUF_* framing */
#include "tlstap.h"        /* struct packet_event, enum pkt_flag */

#define EPB_TYPE 6
#define EPB_HEAD 28        /* type, total length, interface, ts high, ts low, caplen, len */
#define OWNERS_OFF offsetof(struct packet_event, sender)
#define OWNERS_LEN (2 * sizeof(struct sock_owner))
#define KEY_LEN (OWNERS_LEN + 2)       /* owners, dir, caplen & 3 */
#define TRAILER_MAX 256
#define SLOTS 4096                     /* power of two; Python clears the table when full */

enum epb_status {
	EPB_DONE = 0,          /* the whole piece is encoded */
	EPB_NEED_TRAILER = 1,  /* record at res->pos has an unknown key: add it and call again */
	EPB_OUT_FULL = 2,      /* out has no room for the record at res->pos */
	EPB_BAD = -1,          /* a record that is not a packet_event */
};

struct slot {
	uint8_t used;
	uint8_t len;
	uint8_t key[KEY_LEN];
	uint8_t trailer[TRAILER_MAX];
};

struct epb_table {
	uint32_t count;
	struct slot slots[SLOTS];
};

/* What one call did; fields accumulate over calls on the same piece. */
struct epb_result {
	uint64_t pos;          /* bytes of the piece consumed */
	uint64_t out_len;      /* bytes of out written */
	uint64_t count;        /* packets encoded */
	uint64_t first_ts;     /* ts of the first packet (wall clock ns) */
	uint64_t last_ts;      /* ts of the last packet */
	uint64_t crossed;      /* packets with a ts below their predecessor's */
	uint64_t hold_idx;     /* index of the first packet that may need a later secret */
	uint64_t hold_off;     /* its offset in out; (uint64_t)-1 when none */
	int64_t status;        /* enum epb_status */
};

size_t epb_table_size(void)
{
	return sizeof(struct epb_table);
}

size_t epb_key_len(void)
{
	return KEY_LEN;
}

/* Offsets of struct epb_result's fields, then its size: epb_native.Result must match
 * (tests/unit/test_epb_native.py). */
void epb_result_layout(uint64_t *out)
{
	out[0] = offsetof(struct epb_result, pos);
	out[1] = offsetof(struct epb_result, out_len);
	out[2] = offsetof(struct epb_result, count);
	out[3] = offsetof(struct epb_result, first_ts);
	out[4] = offsetof(struct epb_result, last_ts);
	out[5] = offsetof(struct epb_result, crossed);
	out[6] = offsetof(struct epb_result, hold_idx);
	out[7] = offsetof(struct epb_result, hold_off);
	out[8] = offsetof(struct epb_result, status);
	out[9] = sizeof(struct epb_result);
}

/* The key of a record: owners, direction, padding of the packet. */
static void make_key(uint8_t *key, const struct packet_event *ev)
{
	memcpy(key, (const uint8_t *)ev + OWNERS_OFF, OWNERS_LEN);
	key[OWNERS_LEN] = ev->dir;
	key[OWNERS_LEN + 1] = ev->caplen & 3;
}

static uint32_t hash(const uint8_t *key)
{
	uint32_t h = 2166136261u;          /* FNV-1a */
	for (size_t i = 0; i < KEY_LEN; i++)
		h = (h ^ key[i]) * 16777619u;
	return h;
}

static struct slot *find(struct epb_table *t, const uint8_t *key)
{
	for (uint32_t i = hash(key), n = 0; n < SLOTS; i++, n++) {
		struct slot *s = &t->slots[i & (SLOTS - 1)];
		if (!s->used || !memcmp(s->key, key, KEY_LEN))
			return s;
	}
	return NULL;
}

/* Returns 0, or -1 when the table is (three quarters) full or the trailer too long. */
int epb_add_trailer(struct epb_table *t, const uint8_t *key, const uint8_t *trailer, uint32_t len)
{
	if (len > TRAILER_MAX || t->count >= SLOTS / 4 * 3)
		return -1;
	struct slot *s = find(t, key);
	if (!s->used) {
		s->used = 1;
		memcpy(s->key, key, KEY_LEN);
		t->count++;
	}
	s->len = len;
	memcpy(s->trailer, trailer, len);
	return 0;
}

/* The key of the record at piece + pos (KEY_LEN bytes into key); -1 if there is none. */
int epb_key_at(const uint8_t *piece, uint64_t len, uint64_t pos, uint8_t *key)
{
	if (pos + BPF_RINGBUF_HDR_SZ + sizeof(struct packet_event) > len)
		return -1;
	make_key(key, (const struct packet_event *)(piece + pos + BPF_RINGBUF_HDR_SZ));
	return 0;
}

static int in(const uint32_t *pids, uint32_t n, uint32_t pid)
{
	for (uint32_t i = 0; i < n; i++)
		if (pids[i] == pid)
			return 1;
	return 0;
}

/*
 * The packet's copy into the file's buffer, with non-temporal stores on x86-64:
 * the buffer goes to the disk, not back to a CPU, and ~1 GB/s of it written
 * through the caches evicted the traced server's working set from the L3 it
 * shares with us.
 */
#if defined(__x86_64__)
#include <immintrin.h>
#define NT_MIN 1024

static void copy_packet(uint8_t *dst, const uint8_t *src, size_t n)
{
	if (n < NT_MIN) {
		memcpy(dst, src, n);
		return;
	}
	size_t head = (16 - ((uintptr_t)dst & 15)) & 15;
	memcpy(dst, src, head);
	dst += head, src += head, n -= head;
	for (; n >= 64; dst += 64, src += 64, n -= 64) {
		__m128i a = _mm_loadu_si128((const __m128i *)src);
		__m128i b = _mm_loadu_si128((const __m128i *)(src + 16));
		__m128i c = _mm_loadu_si128((const __m128i *)(src + 32));
		__m128i d = _mm_loadu_si128((const __m128i *)(src + 48));
		_mm_stream_si128((__m128i *)dst, a);
		_mm_stream_si128((__m128i *)(dst + 16), b);
		_mm_stream_si128((__m128i *)(dst + 32), c);
		_mm_stream_si128((__m128i *)(dst + 48), d);
	}
	memcpy(dst, src, n);
}

static void copies_done(void)
{
	_mm_sfence();          /* streamed stores are weakly ordered: all visible before we return */
}
#else
static void copy_packet(uint8_t *dst, const uint8_t *src, size_t n)
{
	memcpy(dst, src, n);
}

static void copies_done(void)
{
}
#endif

static void put32(uint8_t *p, uint32_t v)
{
	memcpy(p, &v, 4);                  /* pcapng section is little-endian, like x86 and arm64 */
}

/*
 * Encode the records of piece[res->pos:len] (ring framing: 8-byte header,
 * body padded to 8) into out[res->out_len:cap] until done (the end of the
 * piece, a record cut by it or one still being written), an unknown key, or
 * no room. wall: add to ts_ns for wall-clock ns. key_pids: processes that
 * have logged secrets (a packet they sent needs no wait; see pcapng_mode.py).
 */
void epb_encode(struct epb_table *t, const uint8_t *piece, uint64_t len, uint8_t *out, uint64_t cap,
		uint32_t if_id, int64_t wall, const uint32_t *key_pids, uint32_t nkey_pids,
		struct epb_result *res)
{
	uint64_t pos = res->pos, o = res->out_len;
	uint8_t key[KEY_LEN];

	res->status = EPB_DONE;
	while (pos + BPF_RINGBUF_HDR_SZ <= len) {
		/* acquire: the record's bytes are read only after its BUSY bit is seen clear */
		uint32_t hdr = __atomic_load_n((const uint32_t *)(piece + pos), __ATOMIC_ACQUIRE);
		if (hdr & BPF_RINGBUF_BUSY_BIT)
			break;                     /* still being written: the next piece has it */
		uint32_t rlen = hdr & ~(BPF_RINGBUF_BUSY_BIT | BPF_RINGBUF_DISCARD_BIT);
		uint64_t next = pos + ((rlen + BPF_RINGBUF_HDR_SZ + 7) & ~7ULL);
		if (next > len)
			break;                     /* cut at the end of the piece */
		if (hdr & BPF_RINGBUF_DISCARD_BIT) {
			pos = next;
			continue;
		}
		/* the next record's header, while this one is copied: each record is a first touch
		 * of memory another CPU wrote, and that miss was a quarter of this loop's time */
		if (next + 128 <= len) {
			__builtin_prefetch(piece + next);
			__builtin_prefetch(piece + next + 64);   /* the owners end in the second line */
		}
		const struct packet_event *ev = (const void *)(piece + pos + BPF_RINGBUF_HDR_SZ);
		if (rlen < sizeof(*ev) || rlen - sizeof(*ev) < ev->caplen) {
			res->status = EPB_BAD;
			break;
		}
		make_key(key, ev);
		struct slot *s = find(t, key);
		if (!s || !s->used) {
			res->status = EPB_NEED_TRAILER;
			break;
		}
		uint32_t n = ev->caplen;
		uint32_t total = EPB_HEAD + n + s->len + 4;
		if (o + total > cap) {
			res->status = EPB_OUT_FULL;
			break;
		}
		uint64_t ts = ev->ts_ns + wall;
		if (res->count && ts < res->last_ts)
			res->crossed++;
		if (!res->count)
			res->first_ts = ts;
		res->last_ts = ts;
		if (res->hold_off == (uint64_t)-1 && !(ev->flags & PKT_F_TO_LISTENER) &&
		    !in(key_pids, nkey_pids, ev->sender.pid)) {
			res->hold_idx = res->count;
			res->hold_off = o;
		}
		uint8_t *b = out + o;
		put32(b, EPB_TYPE);
		put32(b + 4, total);
		put32(b + 8, if_id);
		put32(b + 12, (uint32_t)(ts >> 32));
		put32(b + 16, (uint32_t)ts);
		put32(b + 20, n);
		put32(b + 24, ev->len);
		copy_packet(b + EPB_HEAD, (const uint8_t *)(ev + 1), n);
		memcpy(b + EPB_HEAD + n, s->trailer, s->len);
		put32(b + EPB_HEAD + n + s->len, total);
		o += total;
		res->count++;
		pos = next;
	}
	copies_done();
	res->pos = pos;
	res->out_len = o;
}
