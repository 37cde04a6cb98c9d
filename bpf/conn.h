/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Which TCP connection a socket fd is: fd -> struct sock (task->files walk)
 * and the 4-tuple, read with CO-RE. Shared by openssl.bpf.c, gotls.bpf.c and
 * packets.bpf.c. */
#ifndef TLSTAP_CONN_H
#define TLSTAP_CONN_H

#define AF_INET 2
#define AF_INET6 10
#define S_IFMT 00170000
#define S_IFSOCK 0140000

/* Fill a conn_tuple from a struct sock (CO-RE: layouts of the running kernel). */
static __always_inline void read_tuple(struct sock *sk, struct conn_tuple *t)
{
	t->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (t->family != AF_INET && t->family != AF_INET6)
		return;
	t->lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	if (!t->lport)   /* a closed socket has released its port number (inet_put_port) */
		t->lport = bpf_ntohs(BPF_CORE_READ((struct inet_sock *)sk, inet_sport));
	t->rport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (t->family == AF_INET) {
		/* the cast sizes the copy: BPF_CORE_READ_INTO reads sizeof(*dst) */
		BPF_CORE_READ_INTO((__be32 *)t->laddr, sk, __sk_common.skc_rcv_saddr);
		BPF_CORE_READ_INTO((__be32 *)t->raddr, sk, __sk_common.skc_daddr);
	} else {
		BPF_CORE_READ_INTO((struct in6_addr *)t->laddr, sk, __sk_common.skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO((struct in6_addr *)t->raddr, sk, __sk_common.skc_v6_daddr);
	}
}

/* A BTF view of a kernel pointer (6.2+; the verifier makes it a plain move). */
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;

/* fd -> open file of a task (a BTF pointer), NULL if none. Plain loads through
 * the BTF task pointer: the verifier turns them into fault-safe loads, each far
 * cheaper than a bpf_probe_read_kernel call. */
static __always_inline struct file *task_fd_file(struct task_struct *task, int fd)
{
	struct fdtable *fdt = task->files->fdt;
	if (!fdt || (unsigned int)fd >= fdt->max_fds)
		return NULL;
	struct file *f = NULL;
	bpf_probe_read_kernel(&f, sizeof(f), &fdt->fd[fd]);   /* an index: no BTF walk */
	return f;
}

/* The struct sock behind an open file, NULL when it is not a socket. *ino: the
 * socket's inode number, which with the sock's address tells one socket from a
 * later one the slab gave the same memory. */
static __always_inline struct sock *file_sock(struct file *f, __u64 *ino)
{
	if (!f)
		return NULL;
	f = bpf_rdonly_cast(f, bpf_core_type_id_kernel(struct file));
	if ((f->f_inode->i_mode & S_IFMT) != S_IFSOCK)
		return NULL;
	*ino = f->f_inode->i_ino;
	struct socket *sock = bpf_rdonly_cast(f->private_data, bpf_core_type_id_kernel(struct socket));
	return sock ? sock->sk : NULL;
}

/* fd -> struct sock* of the current task, or NULL when fd is not a socket. */
static __always_inline struct sock *fd_to_sock(int fd, __u64 *ino)
{
	return file_sock(task_fd_file(bpf_get_current_task_btf(), fd), ino);
}

#endif
