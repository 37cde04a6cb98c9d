/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* The database audit objects (mysqld.bpf.c, postgres.bpf.c): their records
 * and the layouts user space finds in the server binary and writes into
 * .rodata.layout before load. Mirrored in audit/mysqld.py and
 * audit/postgres.py; tests/abi/test_dbaudit_abi.py checks the mirror. */
#ifndef TLSTAP_DBAUDIT_H
#define TLSTAP_DBAUDIT_H

#define DB_QUERY_MAX 8192       /* query bytes kept; the full length is told */
#define DB_NAME_MAX 64          /* NAME_LEN / NAMEDATALEN: identifiers are shorter */
#define PG_TAG_MAX 32           /* the longest command tag is 26 bytes */
#define PG_ANCESTRY_MAX 4       /* postmaster -> backend is one step */

enum db_counter {
	DCNT_EVENTS = 0,        /* records submitted */
	DCNT_LOST = 1,          /* ring buffer full */
	DCNT_READ_ERRORS = 2,   /* user memory unreadable: record dropped or short */
	DCNT_MAX = 3,
};

/* ---- MariaDB: dispatch_command(command, thd, packet, packet_length, blocking) ---- */

enum mysqld_kind {
	MYSQLD_QUERY = 1,       /* at entry: the command's text */
	MYSQLD_DONE = 2,        /* at return: how it ended */
};

struct mysqld_event {
	__u8 kind;
	__u8 retval;            /* DONE: dispatch_command's bool */
	__u8 _pad0[2];
	__u32 command;          /* enum_server_command (the protocol's command byte) */
	__u64 ts_ns;
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u32 query_len;        /* QUERY: the packet's length (may exceed DB_QUERY_MAX) */
	__u64 conn_id;          /* THD::thread_id: CONNECTION_ID() */
	__u32 da_status;        /* DONE: Diagnostics_area::m_status */
	__u32 sql_errno;        /* DONE: Diagnostics_area::m_sql_errno */
	char comm[16];
	char db[DB_NAME_MAX];   /* QUERY: THD::db when the command starts */
	char query[DB_QUERY_MAX];
};

/* THD and Diagnostics_area member offsets, from the binary's own accessors
 * (audit/mysqld.py); NO_OFF: not found, field left out. */
#define NO_OFF 0xffffffff
struct mysqld_layout {
	__u32 thread_id;        /* THD::thread_id */
	__u32 db;               /* THD::db.str */
	__u32 stmt_da;          /* THD::m_stmt_da */
	__u32 sql_errno;        /* Diagnostics_area::m_sql_errno */
	__u32 status;           /* Diagnostics_area::m_status */
	__u32 _pad;
};

/* ---- PostgreSQL: one backend process per connection ---- */

enum pg_kind {
	PG_SESSION = 1,         /* PostgresMain(dbname, username): name = user, db */
	PG_ACTIVITY = 2,        /* pgstat_report_activity(state, text): text NULL = idle */
	PG_END = 3,             /* EndCommand(qc): name = command tag, rows */
	PG_ERROR = 4,           /* EmitErrorReport(): sqlstate of the error data on top */
};

struct pg_event {
	__u8 kind;
	__u8 msg;               /* the frontend message in progress ('Q', 'P', 'B', 'E'; 0 unknown) */
	__u8 has_text;          /* ACTIVITY: a statement starts (else the backend goes idle) */
	__u8 _pad0;
	__u32 text_len;         /* ACTIVITY: the text's length; DB_QUERY_MAX: cut (longer) */
	__u64 ts_ns;
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u32 sqlstate;         /* ERROR: ErrorData.sqlerrcode (MAKE_SQLSTATE packing) */
	__u64 rows;             /* END: QueryCompletion.nprocessed */
	char comm[16];
	char name[DB_NAME_MAX]; /* SESSION: user; END: command tag */
	char db[DB_NAME_MAX];   /* SESSION: database */
};

struct pg_activity {
	struct pg_event e;
	char text[DB_QUERY_MAX];
};

/* Where the probes read. Addresses of the binary's globals are given
 * relative to the probe that reads them (bpf_get_func_ip), so no load
 * address is needed. */
struct pg_layout {
	__s64 tag_table;        /* GetCommandTagName's table, from the EndCommand probe */
	__s64 errordata;        /* errordata[], from the EmitErrorReport probe */
	__s64 errordata_depth;  /* errordata_stack_depth, likewise */
	__u32 tag_stride;       /* bytes per tag entry (its name pointer first) */
	__u32 qc_tag;           /* QueryCompletion.commandTag */
	__u32 qc_rows;          /* QueryCompletion.nprocessed */
	__u32 errordata_stride; /* sizeof(ErrorData) */
	__u32 sqlerrcode;       /* ErrorData.sqlerrcode */
	__u32 _pad;
};

#endif
