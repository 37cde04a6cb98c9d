/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The kernel/user ABI of tlstap and nothing else: record layouts, enums,
 * limits. src/tlstap/abi.py mirrors every struct here; tests/abi checks the
 * mirror against the BTF of the built objects, so change both together.
 */
#ifndef TLSTAP_H
#define TLSTAP_H

#define TASK_COMM_LEN 16

/* Payload bytes per ring-buffer record. A call larger than this is split
 * into several records (chunks); 32 KiB holds any TLS record (16 KiB max). */
#define CHUNK_MAX (32 * 1024)
/* Upper bound on chunks per call, for the verifier (bpf_loop bound). With
 * CHUNK_MAX this allows a cap of 64 MiB per call. */
#define CHUNKS_MAX 2048

enum record_kind {
	REC_DATA = 1,   /* a chunk of plaintext of one SSL read/write call */
};

enum direction {
	DIR_READ = 1,
	DIR_WRITE = 2,
	DIR_HANDSHAKE = 3,   /* SSL_do_handshake: no data, only learns the socket */
};

/* Uprobe cookie, set per attach point by user space (struct site in abi.py).
 * bits 0-1 direction, bits 8-15 index of the size_t* out-param (0-4) or
 * COOKIE_RET_IS_COUNT when the int return value is the byte count; OpenSSL
 * builds whose layout is established (probes/openssl_keys.py) add bits 16-31,
 * the offset of s3.client_random in the SSL object, and bits 32-47, that of
 * its int `server` flag (COOKIE_NO_OFF: unknown), with which a call on a
 * memory BIO is tied to the socket its handshake's hello went out on. */
#define COOKIE_DIR_MASK 0x3
#define COOKIE_OUT_SHIFT 8
#define COOKIE_RET_IS_COUNT 0xff
#define COOKIE_RANDOM_SHIFT 16
#define COOKIE_SERVER_SHIFT 32
#define COOKIE_NO_OFF 0xffff
/* gotls.bpf.c, on a RET of (*tls.Conn).Read: the function keeps c and b in
 * its argument spill slots (checked by user space), so a call whose entry
 * was not seen (blocked before the capture began) is still read. */
#define COOKIE_GO_SPILLED 0x10000

/* flags of struct data_event */
#define DF_FIRST 0x1        /* first chunk of the call */
#define DF_LAST 0x2         /* last chunk emitted for the call */
#define DF_FD_CACHED 0x4    /* fd came from the per-SSL cache, no syscall seen in this call */

struct conn_tuple {
	__u16 family;        /* AF_INET, AF_INET6, AF_UNIX...; 0 = unknown */
	__u16 lport;         /* host order */
	__u16 rport;         /* host order */
	__u16 _pad;
	__u8 laddr[16];      /* AF_INET: first 4 bytes */
	__u8 raddr[16];
};

/* One ring-buffer record: header then `len` payload bytes. */
struct data_event {
	__u8 kind;           /* enum record_kind */
	__u8 dir;            /* enum direction */
	__u8 flags;          /* DF_* */
	__u8 _pad0;
	__u32 len;           /* payload bytes in this record */
	__u64 ts_ns;         /* bpf_ktime_get_ns() at the call's return */
	__u64 ssl;           /* SSL* of the call (GnuTLS session, PRFileDesc*, *tls.Conn) */
	__u64 call_id;       /* unique per call (per-CPU counter << 8 | cpu) */
	__u64 total;         /* bytes the call really transferred */
	__u64 offset;        /* offset of this chunk within the call's bytes */
	__u64 conn_id;       /* the connection's generation: bpf_ktime_get_ns() when its first
			      * call was seen; renewed when the SSL* is freed or moves to
			      * another socket, so (pid, ssl, conn_id) is one connection */
	__u32 pid;           /* tgid */
	__u32 tid;
	__u32 uid;
	__s32 fd;            /* -1 when unknown */
	char comm[TASK_COMM_LEN];
	struct conn_tuple tuple;
	/* followed by `len` payload bytes */
};

/* Per-CPU counters, indexed by enum counter. */
enum counter {
	CNT_CALLS = 0,       /* calls with bytes > 0 seen */
	CNT_RECORDS,         /* records submitted */
	CNT_BYTES,           /* payload bytes submitted */
	CNT_LOST_RECORDS,    /* records the ring buffer could not take */
	CNT_LOST_BYTES,      /* payload bytes in those */
	CNT_TRUNC_CALLS,     /* calls longer than max_payload */
	CNT_TRUNC_BYTES,     /* bytes not captured because of the cap */
	CNT_READ_ERRORS,     /* bpf_probe_read_user failures (page not present) */
	CNT_LOST_ROOM,       /* of those, lost although the ring had room (ring.h) */
	CNT_MAX,
};

/* Load-time configuration: the only variable in .rodata (see abi.py). */
struct config {
	__u32 target_tgid;   /* 0 = any */
	__u32 target_uid;    /* (u32)-1 = any */
	__u64 max_payload;   /* bytes captured per call; the rest is counted as truncated */
	__u64 target_cgroup; /* cgroup v2 id, 0 = any */
};

/* ---- keylog (keylog.bpf.c) ------------------------------------------------ */

enum key_kind {
	KEY_SECRET = 1,      /* ssl_log_secret(s, label, secret, len): a key log line */
	KEY_UPDATE = 2,      /* tls13_update_key(s, sending): a TLS 1.3 KeyUpdate */
};

#define KEY_LABEL_MAX 48     /* longest NSS label is 31 chars */
#define KEY_SECRET_MAX 64    /* EVP_MAX_MD_SIZE */
#define CLIENT_RANDOM_LEN 32

/* Keylog uprobe cookie, per attach point, so builds with different layouts
 * share one object: bits 0-15 offset of s3.client_random in the SSL object,
 * bits 16-31 offset of its int `server` flag, bit 32 set when the build logs
 * *_TRAFFIC_SECRET_N itself after a KeyUpdate. A server offset of
 * KCOOKIE_NO_SERVER: the library has no key update probe, nothing reads it. */
#define KCOOKIE_SERVER_SHIFT 16
#define KCOOKIE_NO_SERVER 0xffff
#define KCOOKIE_LOGS_UPDATES_SHIFT 32

struct key_event {
	__u8 kind;           /* enum key_kind */
	__u8 server;         /* the SSL object is the server end */
	__u8 sending;        /* KEY_UPDATE: 1 = our sending key changed, 0 = receiving */
	__u8 logs_updates;   /* the build logs *_TRAFFIC_SECRET_N itself (cookie bit 32) */
	__u32 secret_len;    /* KEY_SECRET: bytes of secret used (<= KEY_SECRET_MAX) */
	__u64 ts_ns;
	__u64 ssl;
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u32 _pad1;
	char comm[TASK_COMM_LEN];
	char label[KEY_LABEL_MAX];           /* NUL-terminated */
	__u8 client_random[CLIENT_RANDOM_LEN];
	__u8 secret[KEY_SECRET_MAX];
};

/* Per-CPU counters of keylog.bpf.c, indexed by enum key_counter. */
enum key_counter {
	KCNT_SECRETS = 0,    /* key log lines seen */
	KCNT_UPDATES,        /* key updates seen */
	KCNT_LOST,           /* events the ring buffer could not take */
	KCNT_READ_ERRORS,    /* user memory that could not be read */
	KCNT_MAX,
};

/* ---- pcapng (packets.bpf.c) ----------------------------------------------- */

/* Bytes of one packet copied into a record: tcpdump's default snap length.
 * Loopback GSO packets exceed 64 KiB (85 KiB seen with nginx's sendfile). */
#define PKT_CAP_MAX (256 * 1024)

enum pkt_dir {
	PKT_INGRESS = 1,
	PKT_EGRESS = 2,
};

enum pkt_flag {
	/* TCP to a port a local socket listens on: the receiver is the server of the
	 * connection, which logs its TLS secrets before its peer can use them (the
	 * pcapng writer holds such packets back for no secret; pcapng_mode.py) */
	PKT_F_TO_LISTENER = 1,
};

/* Who owns a TCP connection: sock_owner map value, keyed by struct conn_tuple
 * as the owner sees it (laddr/lport local). Filled from connect/accept in the
 * kernel and from /proc for connections older than the capture. */
struct sock_owner {
	__u32 pid;           /* tgid */
	__u32 uid;
	char comm[TASK_COMM_LEN];
	__s32 fd;            /* the owner's descriptor of the socket (connect, accept, /proc); -1 unknown */
};

/* One ring-buffer record per packet: header then `caplen` bytes from the
 * link-layer header on (none on interfaces without one, e.g. tun). */
struct packet_event {
	__u64 ts_ns;         /* bpf_ktime_get_ns() */
	__u32 ifindex;
	__u32 len;           /* bytes on the wire (skb->len) */
	__u32 caplen;        /* bytes that follow */
	__u8 dir;            /* enum pkt_dir */
	__u8 flags;          /* enum pkt_flag */
	__u8 _pad0[2];
	struct sock_owner sender;    /* pid 0: unknown or not local */
	struct sock_owner receiver;  /* pid 0: unknown or not local */
};

/* Per-CPU counters of packets.bpf.c, indexed by enum pkt_counter. */
enum pkt_counter {
	PCNT_PACKETS = 0,    /* packets submitted */
	PCNT_BYTES,          /* bytes submitted (caplen) */
	PCNT_LOST,           /* packets the ring buffer could not take */
	PCNT_FILTERED,       /* packets the filter or --pid scope left out */
	PCNT_TRUNCATED,      /* packets longer than PKT_CAP_MAX or --snaplen */
	PCNT_LOST_ROOM,      /* of PCNT_LOST, lost although the ring had room (ring.h) */
	PCNT_COPY_ERRORS,    /* of PCNT_LOST, packets whose bytes the skb would not give */
	PCNT_MAX,
};

/* sock_owner map value (packets.bpf.c): the owner the records carry, plus
 * what the --cgroup scope and the end of a connection need. Also the value of
 * the listeners map (keyed by TCP port), which names the owner of a
 * connection not yet accept()ed. */
struct sock_entry {
	struct sock_owner owner;
	__u64 cgroup_id;     /* cgroup v2 id of the owner */
	__u64 closed_ns;     /* bpf_ktime_get_ns() at TCP_CLOSE; 0 = open */
};

/* The in-kernel packet filter (sources/pktfilter.py compiles tcpdump syntax to it):
 * an OR of up to PF_CLAUSES_MAX clauses, each an AND of up to PF_TERMS_MAX
 * terms. No clause: every packet passes. */
#define PF_CLAUSES_MAX 8
#define PF_TERMS_MAX 8

enum pf_kind {
	PF_ETHERTYPE = 1,    /* skb->protocol == lo: ip, ip6, arp, rarp */
	PF_PROTO = 2,        /* IP protocol (IPv6 next header) == lo; family 4, 6 or 0 = both */
	PF_PORT = 3,         /* TCP/UDP/SCTP port in [lo, hi] */
	PF_NET = 4,          /* (address & mask) == addr; family 4 (IPv4 and ARP) or 6 */
	PF_LEN = 5,          /* skb->len in [addr[0], addr[1]] */
};

/* pf_term flags */
#define PF_NOT 0x1           /* negate the term */
#define PF_SRC 0x2           /* PF_PORT/PF_NET: test the source */
#define PF_DST 0x4           /* ... the destination (both bits: either) */
#define PF_BOTH 0x8          /* with PF_SRC|PF_DST: source and destination */

struct pf_term {
	__u8 kind;           /* enum pf_kind */
	__u8 flags;          /* PF_* */
	__u8 family;         /* PF_PROTO, PF_NET: 4 or 6 (0: either, PF_PROTO only) */
	__u8 _pad0;
	__u16 lo;            /* PF_ETHERTYPE, PF_PROTO: the value; PF_PORT: range */
	__u16 hi;
	__u64 addr[2];       /* PF_NET: address bytes (memory order) & mask */
	__u64 mask[2];
};

struct pf_clause {
	__u32 nterms;
	__u32 _pad0;
	struct pf_term terms[PF_TERMS_MAX];
};

/* Second load-time variable of packets.bpf.c, alone in section .rodata.pkt. */
struct pkt_config {
	__u32 link_hdr_len;  /* bytes before the IP header: 14 Ethernet/loopback, 0 tun */
	__u32 snaplen;       /* bytes copied per packet, <= PKT_CAP_MAX */
	__u8 both_local;     /* loopback: sender and receiver are both local sockets */
	__u8 wire;           /* the wire source: only TCP segments with data or SYN/FIN/RST (no bare
			      * ACK: half the packets, none of the bytes), of TLS connections */
	__u8 _pad0[2];
	__u32 nclauses;      /* 0: no filter */
	struct pf_clause clauses[PF_CLAUSES_MAX];
};

#endif
