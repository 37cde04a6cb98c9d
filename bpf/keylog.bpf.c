// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * OpenSSL key log capture (and GnuTLS's: its _gnutls_call_keylog_func takes
 * the same arguments; see probes/gnutls_keys.py).
 *
 * Every line OpenSSL can write to a key log goes through one internal
 * function, ssl_log_secret(s, label, secret, len), which is called whether or
 * not the application set a key log callback (the callback is tested inside).
 * A uprobe there sees label and secret as arguments, so the only layout we
 * need is where the SSL object keeps s3.client_random; user space finds it in
 * the build's own code and passes it in the cookie. TLS 1.3 KeyUpdates never
 * reach ssl_log_secret in older builds (3.x logs "*_TRAFFIC_SECRET_N" there):
 * a probe on tls13_update_key(s, sending) reports each one, so user space can
 * number the library's lines, check them, or derive them (RFC 8446 7.2).
 *
 * Nothing here runs per TLS record: a keep-alive connection costs nothing.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "tlstap.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#include "scope.h"

#include "key_maps.h"

/* Reserve and fill what both events share; NULL if out of scope or no room. */
static __always_inline struct key_event *start_event(struct pt_regs *ctx, void *ssl, __u8 kind)
{
	__u64 id = bpf_get_current_pid_tgid();
	if (!wanted(id))
		return NULL;
	struct key_event *e = bpf_ringbuf_reserve(&key_events, sizeof(*e), 0);
	if (!e) {
		count(KCNT_LOST);
		return NULL;
	}
	__builtin_memset(e, 0, sizeof(*e));
	__u64 cookie = bpf_get_attach_cookie(ctx);
	__u32 cr_off = cookie & 0xffff;
	__u32 server_off = (cookie >> KCOOKIE_SERVER_SHIFT) & 0xffff;
	int server = 0;

	e->kind = kind;
	e->ts_ns = bpf_ktime_get_ns();
	e->ssl = (__u64)ssl;
	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->uid = (__u32)bpf_get_current_uid_gid();
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	if (bpf_probe_read_user(e->client_random, sizeof(e->client_random), ssl + cr_off) ||
	    (server_off != KCOOKIE_NO_SERVER &&
	     bpf_probe_read_user(&server, sizeof(server), ssl + server_off))) {
		count(KCNT_READ_ERRORS);
		bpf_ringbuf_discard(e, 0);
		return NULL;
	}
	e->server = server != 0;
	e->logs_updates = (cookie >> KCOOKIE_LOGS_UPDATES_SHIFT) & 1;
	return e;
}

SEC("uprobe")
int BPF_KPROBE(log_secret_enter, void *ssl, const char *label, const void *secret, __u64 len)
{
	/* OpenSSL passes a size_t, GnuTLS an unsigned int (upper half undefined) */
	len &= 0xffffffff;
	if (len == 0 || len > KEY_SECRET_MAX)
		return 0;
	struct key_event *e = start_event(ctx, ssl, KEY_SECRET);
	if (!e)
		return 0;
	__u32 n = len;
	e->secret_len = n;
	send_key(e, bpf_probe_read_user_str(e->label, sizeof(e->label), label) <= 1 ||
		    bpf_probe_read_user(e->secret, n, secret));
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(update_key_enter, void *ssl, int sending)
{
	struct key_event *e = start_event(ctx, ssl, KEY_UPDATE);
	if (!e)
		return 0;
	e->sending = sending != 0;
	count(KCNT_UPDATES);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

#if defined(__TARGET_ARCH_x86)
/* Go crypto/tls: every secret goes through
 *   func (c *Config) writeKeyLog(label string, clientRandom, secret []byte) error
 * which the handshake calls whether or not KeyLogWriter is set (it returns at
 * once when nil). Register ABI: RAX = c, RBX/RCX = label ptr/len, RDI/RSI =
 * clientRandom ptr/len (R8 cap), R9/R10 = secret ptr/len (R11 cap). The
 * label is a Go string, not NUL-terminated. Go logs no key updates. */
SEC("uprobe")
int BPF_KPROBE(go_keylog_enter)
{
	__u64 label_len = ctx->cx, cr_len = ctx->si, len = ctx->r10;
	if (len == 0 || len > KEY_SECRET_MAX || cr_len != CLIENT_RANDOM_LEN ||
	    label_len == 0 || label_len >= KEY_LABEL_MAX)
		return 0;
	__u64 id = bpf_get_current_pid_tgid();
	if (!wanted(id))
		return 0;
	struct key_event *e = bpf_ringbuf_reserve(&key_events, sizeof(*e), 0);
	if (!e) {
		count(KCNT_LOST);
		return 0;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->kind = KEY_SECRET;
	e->ts_ns = bpf_ktime_get_ns();
	e->ssl = ctx->ax;
	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->uid = (__u32)bpf_get_current_uid_gid();
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	__u32 n = len, ln = label_len;
	e->secret_len = n;
	send_key(e, bpf_probe_read_user(e->label, ln, (void *)ctx->bx) ||
		    bpf_probe_read_user(e->client_random, CLIENT_RANDOM_LEN, (void *)ctx->di) ||
		    bpf_probe_read_user(e->secret, n, (void *)ctx->r9));
	return 0;
}
#endif
