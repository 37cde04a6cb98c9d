/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The kernel/user ABI of shell.bpf.c (tlstap bash, tlstap zsh). Mirrored in
 * src/tlstap/audit/shell.py; tests/unit/test_shell_abi.py checks the mirror
 * against the object's BTF and this file's text.
 */
#ifndef TLSTAP_SHELL_H
#define TLSTAP_SHELL_H

/* Line bytes per record, the NUL included: a longer line comes in several
 * records (SF_MORE), up to SHELL_CHUNKS_MAX of them, then SF_TRUNCATED. */
#define SHELL_LINE_MAX 4096
#define SHELL_CHUNKS_MAX 16
#define SHELL_TTY_MAX 32

enum shell_kind {
	SHELL_LINE = 1,      /* a line the shell read for a command (more chunks: SF_MORE) */
	SHELL_PROMPT = 2,    /* the shell starts reading its next command: status is $? */
};

/* flags of struct shell_event */
#define SF_MORE 0x1         /* the line goes on in the next record */
#define SF_TRUNCATED 0x2    /* the line was longer than SHELL_CHUNKS_MAX records */

enum shell_counter {
	SCNT_LINES = 0,
	SCNT_PROMPTS = 1,
	SCNT_LOST = 2,          /* records the ring buffer had no room for */
	SCNT_READ_ERRORS = 3,   /* a line or the status could not be read */
	SCNT_MAX = 4,
};

/* One record. A SHELL_PROMPT record ends before `line`. */
struct shell_event {
	__u8 kind;
	__u8 flags;
	__u16 len;              /* bytes in line, NUL not counted */
	__s32 status;           /* SHELL_PROMPT: the exit status global's value */
	__u64 ts_ns;            /* bpf_ktime_get_ns */
	__u64 start_ns;         /* the shell's start (boot time): tells a reused pid */
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u32 _pad;
	char comm[16];
	char tty[SHELL_TTY_MAX];   /* the controlling terminal's name (pts3), "" if none */
	char line[SHELL_LINE_MAX];
};

/* Where the probes find the shell's globals: each *_off is a global's
 * address minus the address of the probed instruction (the probe's ip), so
 * it holds for every process of a PIE build; 0 = not used. Set before load. */
struct shell_config {
	__s64 status_off;   /* prompt probe: the exit status (an int, or zsh's zlong's low half) */
	__s64 nest_off;     /* bash's prompt probe: nonzero when the parser is nested (eval, source) */
	__s64 busy_off;     /* bash's read probe: nonzero when a builtin reads (read -e) */
	__s32 read_cmd;     /* zsh's zleentry: the cmd that reads a line (ZLE_CMD_READ) */
	__s32 start_ctx;    /* zsh: the zle context of a command's first line (PS1) */
	__s32 select_ctx;   /* zsh: the contexts of select's reply and of vared, */
	__s32 vared_ctx;    /*      which are no commands */
};

#endif
