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
};

/* Uprobe cookie, set per attach point by user space (struct site in abi.py).
 * bits 0-1 direction, bits 8-15 index of the size_t* out-param (0-4) or
 * COOKIE_RET_IS_COUNT when the int return value is the byte count. */
#define COOKIE_DIR_MASK 0x3
#define COOKIE_OUT_SHIFT 8
#define COOKIE_RET_IS_COUNT 0xff

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
	__u64 ssl;           /* SSL* of the call: the connection's identity in the process */
	__u64 call_id;       /* unique per call (per-CPU counter << 8 | cpu) */
	__u64 total;         /* bytes the call really transferred */
	__u64 offset;        /* offset of this chunk within the call's bytes */
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
	CNT_MAX,
};

/* Load-time configuration: the only variable in .rodata (see abi.py). */
struct config {
	__u32 target_tgid;   /* 0 = any */
	__u32 target_uid;    /* (u32)-1 = any */
	__u64 max_payload;   /* bytes captured per call; the rest is counted as truncated */
	__u64 target_cgroup; /* cgroup v2 id, 0 = any */
};

#endif
