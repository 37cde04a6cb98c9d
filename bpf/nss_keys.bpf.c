// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * NSS key log capture: the secrets NSS would write with SSLKEYLOGFILE (which
 * distributions compile out), read where they are computed.
 *
 * NSS keeps secrets as PKCS#11 handles; their bytes exist in user memory only
 * inside softoken, which computes them with freebl (libfreeblpriv3.so) and
 * reaches freebl only through FREEBL_GetVector's table of function pointers,
 * whose order is freebl's ABI. User space (probes/nss_keys.py) finds the
 * functions below through that table and attaches:
 *
 * TLS 1.3: every secret of the key schedule is HKDF-Expand-Label(secret,
 *   label, Transcript-Hash, Hash.length), which softoken computes as
 *   HMAC_Update(cx, info) ... HMAC_Finish(cx, out): info holds the label
 *   ("tls13 c hs traffic") and the transcript hash, out the secret. The
 *   client random is joined through the transcript hash: libssl hashes the
 *   handshake with the exported PK11_DigestOp/PK11_CloneContext/
 *   PK11_DigestFinal (libnss3.so), and the first message of every transcript
 *   is the ClientHello, whose bytes 6..37 are the client random. So a digest
 *   context that was fed a ClientHello is tagged with its random, clones
 *   inherit the tag, and each digest it finishes maps the hash value to the
 *   random; the HKDF info's context is then looked up by value.
 * TLS 1.2 (and 1.0/1.1): the key block is PRF(master_secret, "key expansion",
 *   server_random + client_random); freebl's TLS_P_hash (TLS 1.2) and TLS_PRF
 *   (older) receive all three, as SECItems (public ABI: type, data, len).
 *
 * Events are struct key_event (tlstap.h) with kind KEY_SECRET. For TLS 1.3
 * the label is the HKDF label as NSS passes it ("c hs traffic"; user space
 * keeps the ones NSS logs and names them) and an all-zero client random means
 * no transcript tagged with a ClientHello produced the context.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "tlstap.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#include "scope.h"

#include "key_maps.h"

#define HASH_MAX 48          /* SHA-384, the longest TLS 1.3 transcript hash */
#define HS_HEADER 4          /* handshake message: type, 24-bit length */
#define CH_TYPE 1            /* client_hello */
#define SH_TYPE 2            /* server_hello (a HelloRetryRequest is one) */
#define MSG_HASH_TYPE 254    /* message_hash */
/* HkdfLabel: uint16 length, opaque label<7..255> ("tls13 " + label), opaque
 * context<0..255>. The labels NSS logs are at most "tls13 e exp master". */
#define INFO_PREFIX "tls13 "
#define INFO_PREFIX_LEN 6
#define INFO_LABEL_MAX 12
#define INFO_MIN (2 + 1 + INFO_PREFIX_LEN + 1 + 1 + 32)
#define INFO_MAX (2 + 1 + INFO_PREFIX_LEN + INFO_LABEL_MAX + 1 + HASH_MAX)
#define INFO_BUF 128         /* a power of two above INFO_MAX: reads are masked to it */
#define MASTER_LEN 48
#define KEY_EXPANSION "key expansion"

struct ptr_key {
	__u32 tgid;
	__u32 _pad;
	__u64 ptr;
};

struct random {
	__u8 b[CLIENT_RANDOM_LEN];
};

struct hash_key {
	__u32 tgid;
	__u32 len;
	__u8 hash[HASH_MAX];
};

/* digest context (PK11Context *) -> the client random of its transcript */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct ptr_key);
	__type(value, struct random);
} transcripts SEC(".maps");

/* transcript hash value -> client random; entries age out (LRU) */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct hash_key);
	__type(value, struct random);
} hashes SEC(".maps");

struct digest_call {
	__u64 out;           /* PK11_DigestFinal: where the hash goes; 0 for a clone */
	__u64 out_len;       /* its unsigned int *outLen */
	struct random r;
};

/* thread -> its pending PK11_CloneContext / PK11_DigestFinal of a tagged context */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct digest_call);
} digest_calls SEC(".maps");

struct hkdf {
	__u64 out;           /* HMAC_Finish's result, set at its entry */
	__u32 len;           /* secret length (= hash length) */
	__u8 label[INFO_LABEL_MAX + 1];
	__u8 _pad[3];
	struct random r;     /* zero when the context hash is unknown */
};

/* HMACContext * -> the derivation it computes, from HMAC_Update's info */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct ptr_key);
	__type(value, struct hkdf);
} hkdfs SEC(".maps");

/* thread -> the HKDF whose HMAC_Finish is running */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct hkdf);
} finishing SEC(".maps");

/* HMAC_Update's info, too big for the stack next to the rest */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u8[INFO_BUF]);
} scratch SEC(".maps");

static __always_inline struct ptr_key pkey(__u64 id, const void *p)
{
	struct ptr_key k = { .tgid = id >> 32, .ptr = (__u64)p };
	return k;
}

/* A key_event with the fields every event has; NULL if no room. */
static __always_inline struct key_event *new_event(__u64 id)
{
	struct key_event *e = bpf_ringbuf_reserve(&key_events, sizeof(*e), 0);
	if (!e) {
		count(KCNT_LOST);
		return NULL;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->kind = KEY_SECRET;
	e->ts_ns = bpf_ktime_get_ns();
	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->uid = (__u32)bpf_get_current_uid_gid();
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	return e;
}

/* ---- transcripts (libnss3.so) ---------------------------------------------- */

/* PK11_DigestOp(PK11Context *ctx, const unsigned char *in, unsigned len):
 * a transcript starts with a ClientHello (type 1, legacy_version 3,3); after a
 * HelloRetryRequest it restarts with message_hash(Hash(ClientHello1)), the
 * retry request and ClientHello2 (same random), which libssl buffers and hashes
 * in one call once the hash is known (RFC 8446 4.4.1). */
SEC("uprobe")
int BPF_KPROBE(digest_op_enter, void *pctx, const __u8 *in, __u64 len)
{
	__u8 head[HS_HEADER + 2];
	struct random r;
	__u64 id = bpf_get_current_pid_tgid();
	__u32 n = len & 0xffffffff, at = 0;

	if (n < HS_HEADER + 2 + CLIENT_RANDOM_LEN || !wanted(id))
		return 0;
	if (bpf_probe_read_user(head, sizeof(head), in))
		return 0;
	if (head[0] == MSG_HASH_TYPE) {
		if (head[1] || head[2] || (head[3] != 32 && head[3] != HASH_MAX))
			return 0;
		at = HS_HEADER + head[3];
		if (bpf_probe_read_user(head, sizeof(head), in + at) || head[0] != SH_TYPE)
			return 0;
		at += HS_HEADER + ((__u32)head[1] << 16 | (__u32)head[2] << 8 | head[3]);
		if (at + sizeof(head) + CLIENT_RANDOM_LEN > n ||
		    bpf_probe_read_user(head, sizeof(head), in + at))
			return 0;
	}
	if (head[0] != CH_TYPE || head[4] != 3 || head[5] != 3)
		return 0;
	if (bpf_probe_read_user(&r, sizeof(r), in + at + sizeof(head))) {
		count(KCNT_READ_ERRORS);
		return 0;
	}
	struct ptr_key k = pkey(id, pctx);
	bpf_map_update_elem(&transcripts, &k, &r, BPF_ANY);
	return 0;
}

/* PK11_DestroyContext(ctx, freeit): its address may serve another digest next */
SEC("uprobe")
int BPF_KPROBE(digest_destroy_enter, void *pctx)
{
	struct ptr_key k = pkey(bpf_get_current_pid_tgid(), pctx);
	bpf_map_delete_elem(&transcripts, &k);
	return 0;
}

/* PK11_CloneContext(old) -> new: libssl finishes a clone of the running transcript */
SEC("uprobe")
int BPF_KPROBE(clone_enter, void *old)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct ptr_key k = pkey(id, old);
	struct random *r = bpf_map_lookup_elem(&transcripts, &k);
	if (!r)
		return 0;
	struct digest_call c = { .r = *r };
	bpf_map_update_elem(&digest_calls, &id, &c, BPF_ANY);
	return 0;
}

SEC("uretprobe")
int BPF_KRETPROBE(clone_exit, void *copy)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct digest_call *c = bpf_map_lookup_elem(&digest_calls, &id);
	if (!c)
		return 0;
	if (copy) {
		struct ptr_key k = pkey(id, copy);
		bpf_map_update_elem(&transcripts, &k, &c->r, BPF_ANY);
	}
	bpf_map_delete_elem(&digest_calls, &id);
	return 0;
}

/* PK11_DigestFinal(ctx, unsigned char *out, unsigned *outLen, unsigned max) */
SEC("uprobe")
int BPF_KPROBE(digest_final_enter, void *pctx, void *out, void *out_len)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct ptr_key k = pkey(id, pctx);
	struct random *r = bpf_map_lookup_elem(&transcripts, &k);
	if (!r)
		return 0;
	struct digest_call c = { .out = (__u64)out, .out_len = (__u64)out_len, .r = *r };
	bpf_map_update_elem(&digest_calls, &id, &c, BPF_ANY);
	return 0;
}

SEC("uretprobe")
int BPF_KRETPROBE(digest_final_exit, int rv)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct digest_call *c = bpf_map_lookup_elem(&digest_calls, &id);
	if (!c)
		return 0;
	struct hash_key hk = { .tgid = id >> 32 };
	if (rv == 0 && c->out &&   /* SECSuccess */
	    !bpf_probe_read_user(&hk.len, sizeof(hk.len), (void *)c->out_len) &&
	    (hk.len == 32 || hk.len == HASH_MAX)) {
		if (bpf_probe_read_user(hk.hash, hk.len & HASH_MAX, (void *)c->out))
			count(KCNT_READ_ERRORS);
		else
			bpf_map_update_elem(&hashes, &hk, &c->r, BPF_ANY);
	}
	bpf_map_delete_elem(&digest_calls, &id);
	return 0;
}

/* ---- TLS 1.3 secrets (libfreeblpriv3.so) ----------------------------------- */

/* HMAC_Update(HMACContext *cx, const unsigned char *data, unsigned len):
 * takes the call whose data is a TLS 1.3 HkdfLabel with a hash as context. */
SEC("uprobe")
int BPF_KPROBE(hmac_update_enter, void *cx, const __u8 *data, __u64 len)
{
	__u32 zero = 0, n = len & 0xffffffff;
	__u64 id = bpf_get_current_pid_tgid();

	if (n < INFO_MIN || n > INFO_MAX || !wanted(id))
		return 0;
	__u8 *info = bpf_map_lookup_elem(&scratch, &zero);
	/* the compiler turns the range test into one the verifier cannot follow: mask anew */
	asm volatile("" : "+r"(n));
	if (!info || bpf_probe_read_user(info, n & (INFO_BUF - 1), data))
		return 0;
	__u32 out_len = (__u32)info[0] << 8 | info[1];
	__u32 label_len = info[2];      /* with "tls13 " */
	if (label_len <= INFO_PREFIX_LEN || label_len > INFO_PREFIX_LEN + INFO_LABEL_MAX)
		return 0;
	const char prefix[] = INFO_PREFIX;
	for (int i = 0; i < INFO_PREFIX_LEN; i++)
		if (info[3 + i] != prefix[i])
			return 0;
	__u32 ctx_at = 3 + label_len;   /* < INFO_MAX - HASH_MAX */
	__u32 hash_len = info[ctx_at & 31];
	if ((hash_len != 32 && hash_len != HASH_MAX) || out_len != hash_len ||
	    ctx_at + 1 + hash_len != n)
		return 0;

	struct hash_key hk = { .tgid = id >> 32, .len = hash_len };
	if (bpf_probe_read_kernel(hk.hash, hash_len & HASH_MAX, info + ((ctx_at + 1) & 31)))
		return 0;
	struct hkdf h = { .len = hash_len };
	for (int i = 0; i < INFO_LABEL_MAX; i++)
		if (i < label_len - INFO_PREFIX_LEN)
			h.label[i] = info[3 + INFO_PREFIX_LEN + i];
	struct random *r = bpf_map_lookup_elem(&hashes, &hk);
	if (r)
		h.r = *r;
	struct ptr_key k = pkey(id, cx);
	bpf_map_update_elem(&hkdfs, &k, &h, BPF_ANY);
	return 0;
}

/* HMAC_Finish(cx, unsigned char *result, unsigned *resultLen, unsigned max) */
SEC("uprobe")
int BPF_KPROBE(hmac_finish_enter, void *cx, void *result)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct ptr_key k = pkey(id, cx);
	struct hkdf *h = bpf_map_lookup_elem(&hkdfs, &k);
	if (!h)
		return 0;
	h->out = (__u64)result;
	bpf_map_update_elem(&finishing, &id, h, BPF_ANY);
	bpf_map_delete_elem(&hkdfs, &k);
	return 0;
}

SEC("uretprobe")
int BPF_KRETPROBE(hmac_finish_exit, int rv)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct hkdf *h = bpf_map_lookup_elem(&finishing, &id);
	if (!h)
		return 0;
	struct key_event *e = rv == 0 ? new_event(id) : NULL;
	if (e) {
		e->ssl = h->out;
		e->secret_len = h->len;
		__builtin_memcpy(e->label, h->label, sizeof(h->label));
		__builtin_memcpy(e->client_random, h->r.b, CLIENT_RANDOM_LEN);
		send_key(e, bpf_probe_read_user(e->secret, h->len & HASH_MAX, (void *)h->out));
	}
	bpf_map_delete_elem(&finishing, &id);
	return 0;
}

/* ---- TLS 1.2 and older (libfreeblpriv3.so) ---------------------------------- */

struct sec_item {            /* SECItem: the public ABI of NSS's byte strings */
	__u32 type;
	__u32 _pad;
	__u64 data;
	__u32 len;
};

/* The key block: PRF(master secret, "key expansion", server_random + client_random). */
static __always_inline int key_expansion(const struct sec_item *secret_p, const char *label,
					 const struct sec_item *seed_p)
{
	char want[] = KEY_EXPANSION, got[sizeof(KEY_EXPANSION)];
	struct sec_item secret, seed;
	__u64 id = bpf_get_current_pid_tgid();

	if (!wanted(id) || !label || bpf_probe_read_user(got, sizeof(got), label))
		return 0;
	for (int i = 0; i < sizeof(want); i++)
		if (got[i] != want[i])
			return 0;
	if (bpf_probe_read_user(&secret, sizeof(secret), secret_p) ||
	    bpf_probe_read_user(&seed, sizeof(seed), seed_p)) {
		count(KCNT_READ_ERRORS);
		return 0;
	}
	/* TLS_PRF hands TLS_P_hash the halves of the secret: only the whole is a line */
	if (secret.len != MASTER_LEN || seed.len != 2 * CLIENT_RANDOM_LEN)
		return 0;
	struct key_event *e = new_event(id);
	if (!e)
		return 0;
	__builtin_memcpy(e->label, "CLIENT_RANDOM", sizeof("CLIENT_RANDOM"));
	e->secret_len = MASTER_LEN;
	send_key(e, bpf_probe_read_user(e->secret, MASTER_LEN, (void *)secret.data) ||
		    bpf_probe_read_user(e->client_random, CLIENT_RANDOM_LEN,
					(void *)(seed.data + CLIENT_RANDOM_LEN)));
	return 0;
}

/* TLS_P_hash(HASH_HashType, const SECItem *secret, const char *label, SECItem *seed, ...) */
SEC("uprobe")
int BPF_KPROBE(p_hash_enter, int hash_type, const struct sec_item *secret, const char *label,
	       const struct sec_item *seed)
{
	return key_expansion(secret, label, seed);
}

/* TLS_PRF(const SECItem *secret, const char *label, SECItem *seed, ...) (TLS 1.0/1.1) */
SEC("uprobe")
int BPF_KPROBE(prf_enter, const struct sec_item *secret, const char *label,
	       const struct sec_item *seed)
{
	return key_expansion(secret, label, seed);
}
