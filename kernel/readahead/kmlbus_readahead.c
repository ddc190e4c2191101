// SPDX-License-Identifier: GPL-2.0
/*
 * kmlbus_readahead: the page cache's readahead window as kmlbus proxy
 * "readahead".
 *
 * A stream is one open file's readahead state (struct file_ra_state, the
 * file's f_ra): that is what the kernel's readahead algorithm keeps per
 * reader, so it is the natural unit to size a window for.  Streams are hashed
 * into RA_STREAMS slots; the slot index is the proxy key.
 *
 * Decision points: the kernel's three readahead entry points for files,
 *   page_cache_sync_ra()   a read() missed the page cache (the reader waits),
 *   page_cache_async_ra()  a read() reached the PG_readahead marker,
 *   filemap_fault()        an mmap fault, decided only when the page is
 *                          missing (read-around) or carries the marker,
 * for regular files on the block devices named by the "devices" parameter.
 * The decision is the window's upper bound, ra_pages (pages); the stock
 * algorithm then sizes the actual window (ramp-up, async marker) under it.
 *
 * Mechanism: kretprobes (register_kretprobe is GPL-exported on 6.1).  The
 * entry handler decides and writes f_ra.ra_pages before the kernel reads it;
 * the return handler writes the stock value back.  So the file's own
 * ra_pages is stock whenever no call of ours is in flight: nothing of ours
 * outlives a call, the module never touches a file after the call on it
 * returned (mmap faults pin the file for the call, since filemap_fault may
 * drop mmap_lock), fadvise() and the bdi default keep working, and after
 * rmmod every file is stock.  A tracepoint cannot change the window before it
 * is sized, and changing bdi->ra_pages would act per device, not per stream.
 *
 * The default decision is the value the file already holds, so in emergency
 * nothing is written: stock behaviour, byte for byte.
 *
 * Features describe the reader, not the windows it was given: they are
 * measured on every access of the stream (each read() through a kprobe on
 * filemap_read, each mmap fault at filemap_fault's entry), whether or not it
 * reaches readahead: how often an access starts where the previous one ended
 * (within RA_SEQ_GAP pages), the log of the jump between accesses, the
 * request size, mmap or read.  Statistics of the applied windows (hits,
 * misses, the current window size) would change with the policy serving them,
 * so a model fitted on explored decisions would be fed other states when it
 * serves.
 *
 * Hold: a stream's decision is held for hold_ms (module parameter): the
 * stream's decision points within the period reuse its value and arm without
 * asking kmlbus again, and the first one after it reports the period and
 * decides anew.  A window's effect outlasts the call that set it (what it read
 * ahead is consumed by the accesses after the next decision point), so
 * feedback measured from one decision point to the next would credit one arm
 * with what another arm's window did whenever arms alternate between
 * decisions.  Over a period of one arm only, the credit is that arm's.  A
 * change of the proxy's mode ends the hold at once (killing the bus gives
 * emergency, hence stock, at the next decision point).  hold_ms=0 decides at
 * every decision point.
 *
 * Streams: a stream is known by the address of its file_ra_state, and
 * opening a file starts a new one (a kprobe on file_ra_state_init, which
 * every open calls for the new file's f_ra), so a file opened where a closed
 * one's state was inherits neither its statistics nor its period.  The open
 * is where a stream begins for read() and mmap alike; a file's first read()
 * (f_ra.prev_pos still -1) would tell only of readers, since faults leave
 * prev_pos alone, and a file only ever mapped would be known by address.
 *
 * Warm-up: a new stream's first warmup_accesses accesses (module parameter,
 * 0..1024, default 8) are decided at every decision point, unheld, and their
 * decisions are not reported as feedback.  Without it a new stream's first
 * decision is taken on statistics of no access at all and held a whole
 * period, so a short stream (a file opened and read once, LMDB lookups) is
 * decided blind for most or all of its life; and a period that began blind
 * would credit the arm with a rate the features did not choose.  Each
 * warm-up decision sees the statistics of the accesses so far.  They are
 * counted in stats as warmup.
 *
 * Feedback (kml_proxy_report when the period ends): the reader's progress
 * rate over the period, in pages per millisecond (scale 1000): the pages its
 * accesses asked for during the period, over the period's time.
 * Readahead exists to make readers progress: a window too small makes a
 * sequential reader wait on each small I/O, a window too large makes a random
 * reader wait for pages it never uses, and both show as a lower rate.  Page
 * use before eviction would be known only at eviction, long after the
 * decision, often never.
 *
 * Locking: one spinlock per slot (irq-safe: handlers run with preemption
 * disabled, kml_proxy_decide may be called in any context) guards the slot's
 * statistics and its busy flag.  A slot is busy from a decision to the return
 * of the call it was made for; a second call on a busy slot (a nested
 * page_cache_async_ra inside filemap_fault, another thread of the same
 * stream, a colliding stream) neither decides nor writes.  Module exit stops
 * new decisions, waits for busy slots to clear (each restores its file), and
 * only then unregisters the probes.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/blkdev.h>
#include <linux/delay.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/hash.h>
#include <linux/kprobes.h>
#include <linux/math64.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/pagemap.h>
#include <linux/ptrace.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/string.h>
#include <linux/timekeeping.h>
#include <linux/xarray.h>

#include <kmlbus/kmlbus.h>

#define RA_HASH_BITS	8
#define RA_STREAMS	(1U << RA_HASH_BITS)
#define RA_MAX_WINDOW	2048		/* pages: 8 MiB of 4 KiB pages */
#define RA_SCALE	1000
#define RA_MAX_DEVICES	4
#define RA_MAXACTIVE	64		/* calls in flight per probe (faults sleep) */
#define RA_DRAIN_MS	30000		/* longest wait for calls in flight at exit */
#define RA_SEQ_GAP	64		/* pages: an access this close after the last is sequential */
#define RA_HOLD_MS	1000		/* default period a decision is held per stream */
#define RA_MAX_HOLD_MS	60000
#define RA_WARMUP	8		/* default accesses of a new stream decided unheld */
#define RA_MAX_WARMUP	1024

/* Every feature is a statistic of the reader's own accesses (see the top). */
enum ra_feature {
	RA_F_SEQ,	/* EWMA of sequential accesses, permille */
	RA_F_REQ,	/* EWMA of the request size, pages * 1000 */
	RA_F_MMAP,	/* this access is an mmap fault: 1000, a read(): 0 */
	RA_F_JUMP,	/* EWMA of log2(1 + pages between accesses) * 1000 */
	RA_F_STOCK,	/* the file's own ra_pages (stock bound), pages */
	RA_NFEATURES
};

static_assert(RA_NFEATURES <= KMLBUS_MAX_FEATURES);

struct ra_stream {
	spinlock_t lock;
	const struct file_ra_state *ra;	/* owner tag, compared only */
	bool busy;
	bool held;		/* prev is in force until t_ns + hold */
	unsigned int stock;	/* ra_pages before the decision, restored on return */
	pgoff_t last;		/* last page of the reader's previous access */
	u64 progress;		/* pages the reader asked for since the period began */
	u32 accesses;		/* since the stream began, saturating above RA_MAX_WARMUP */
	u64 t_ns;		/* the held decision's period began */
	s32 seq, reqavg, jump;	/* EWMAs of the accesses, feature scales */
	struct kml_decision prev;
};

/* Per call in flight (kretprobe instance data). */
struct ra_call {
	struct file_ra_state *ra;
	struct file *pinned;	/* fault path: our reference, dropped on return */
	u32 slot;
};

static char *devices;
module_param(devices, charp, 0444);
MODULE_PARM_DESC(devices, "comma-separated block devices whose files are in scope (e.g. nullb0)");

static char ra_devs[RA_MAX_DEVICES][DISK_NAME_LEN];
static int ra_ndevs;
static struct ra_stream *ra_streams;
static struct kml_proxy *ra_proxy;
static bool ra_draining;
static unsigned int hold_ms = RA_HOLD_MS;

static int ra_hold_set(const char *val, const struct kernel_param *kp)
{
	return param_set_uint_minmax(val, kp, 0, RA_MAX_HOLD_MS);
}

static const struct kernel_param_ops ra_hold_ops = {
	.set	= ra_hold_set,
	.get	= param_get_uint,
};
module_param_cb(hold_ms, &ra_hold_ops, &hold_ms, 0644);
MODULE_PARM_DESC(hold_ms, "ms a stream keeps one decision (one arm) before the next; 0..60000, default 1000");

static unsigned int warmup_accesses = RA_WARMUP;

static int ra_warmup_set(const char *val, const struct kernel_param *kp)
{
	return param_set_uint_minmax(val, kp, 0, RA_MAX_WARMUP);
}

static const struct kernel_param_ops ra_warmup_ops = {
	.set	= ra_warmup_set,
	.get	= param_get_uint,
};
module_param_cb(warmup_accesses, &ra_warmup_ops, &warmup_accesses, 0644);
MODULE_PARM_DESC(warmup_accesses, "a new stream's first accesses decided at every decision point, unheld and unreported; 0..1024, default 8");

/*
 * What deciding costs: windows applied (decision points served, held or
 * decided), decisions asked of kmlbus (warm-up ones among them, also counted
 * apart), and ns spent in ra_enter for them all.
 */
static atomic64_t ra_windows = ATOMIC64_INIT(0);
static atomic64_t ra_decisions = ATOMIC64_INIT(0);
static atomic64_t ra_warmups = ATOMIC64_INIT(0);
static atomic64_t ra_decide_ns = ATOMIC64_INIT(0);

static int ra_stats_get(char *buf, const struct kernel_param *kp)
{
	return scnprintf(buf, PAGE_SIZE, "windows=%lld decisions=%lld warmup=%lld decide_ns=%lld\n",
			 (long long)atomic64_read(&ra_windows),
			 (long long)atomic64_read(&ra_decisions),
			 (long long)atomic64_read(&ra_warmups),
			 (long long)atomic64_read(&ra_decide_ns));
}

static const struct kernel_param_ops ra_stats_ops = {
	.get	= ra_stats_get,
};
module_param_cb(stats, &ra_stats_ops, NULL, 0444);
MODULE_PARM_DESC(stats, "windows applied, decisions asked of kmlbus, warm-up decisions among them, ns spent on the windows (entry handler, without the probe's trap)");

static s32 ra_ewma(s32 avg, s32 x)
{
	return avg + (x - avg) / 4;
}

/* Regular files on a named block device; everything else is left alone. */
static bool ra_in_scope(const struct address_space *mapping)
{
	const struct inode *host = mapping ? mapping->host : NULL;
	const struct block_device *bdev;
	int i;

	if (!host || !S_ISREG(host->i_mode) || !host->i_sb)
		return false;
	bdev = host->i_sb->s_bdev;
	if (!bdev || !bdev->bd_disk)
		return false;
	for (i = 0; i < ra_ndevs; i++)
		if (!strncmp(bdev->bd_disk->disk_name, ra_devs[i], DISK_NAME_LEN))
			return true;
	return false;
}

/* Start stream @ra's statistics afresh in its slot (a new stream, or a colliding one). */
static void ra_claim(struct ra_stream *s, const struct file_ra_state *ra, pgoff_t index)
{
	s->ra = ra;
	s->held = false;
	s->seq = index == 0 ? RA_SCALE : 0;
	s->reqavg = RA_SCALE;
	s->jump = 0;
	s->last = index ? index - 1 : 0;
	s->progress = 0;
	s->accesses = 0;
}

/*
 * One access of stream @ra: @npages pages from page @index.  Called with the
 * slot's lock held, for every access in scope, whatever the window.
 */
static void ra_access(struct ra_stream *s, const struct file_ra_state *ra, pgoff_t index,
		      unsigned long npages)
{
	u64 gap;
	bool seq;

	if (s->ra != ra)
		ra_claim(s, ra, index);
	if (s->accesses <= RA_MAX_WARMUP)
		s->accesses++;
	npages = clamp_t(unsigned long, npages, 1, RA_MAX_WINDOW);
	seq = index >= s->last && index - s->last <= RA_SEQ_GAP;
	gap = index >= s->last ? index - s->last : s->last - index;
	s->seq = ra_ewma(s->seq, seq ? RA_SCALE : 0);
	s->reqavg = ra_ewma(s->reqavg, npages * RA_SCALE);
	s->jump = ra_ewma(s->jump, (s32)ilog2(gap + 1) * RA_SCALE);
	s->last = index + npages - 1;
	s->progress += npages;
}

/* Pages per ms * RA_SCALE that the reader asked for since the period began. */
static s32 ra_rate(const struct ra_stream *s, u64 now)
{
	u64 dt = max_t(u64, now - s->t_ns, 1);
	u64 progress = max_t(u64, s->progress, 1);

	return (s32)min_t(u64, div64_u64(progress * NSEC_PER_MSEC * RA_SCALE, dt), S32_MAX);
}

/*
 * True while stream @s's decision holds at @now: its period has not ended and
 * the proxy is still in the mode it was decided in.
 */
static bool ra_holding(const struct ra_stream *s, u64 now)
{
	u64 hold = (u64)READ_ONCE(hold_ms) * NSEC_PER_MSEC;

	return s->held && now - s->t_ns < hold &&
	       kml_proxy_mode(ra_proxy) == s->prev.mode;
}

/*
 * Decide the window for stream @ra at page @index, or reuse the decision
 * its period holds; during the stream's warm-up, decide unheld.  @mmap: a
 * fault (accesses are counted by ra_note_access before they reach
 * readahead).  Returns 0 with
 * @call filled when a window is in place until the call returns, 1 when this
 * call leaves the file as it is.
 */
static int ra_enter(struct file_ra_state *ra, pgoff_t index, bool mmap, struct ra_call *call)
{
	u32 slot = hash_ptr(ra, RA_HASH_BITS);
	struct ra_stream *s = &ra_streams[slot];
	struct kml_decision prev, dec;
	s32 f[RA_NFEATURES], eff = 0, window;
	bool report = false, warm;
	unsigned long flags;
	u64 now = ktime_get_ns();
	unsigned int cur;

	spin_lock_irqsave(&s->lock, flags);
	if (READ_ONCE(ra_draining) || s->busy) {
		spin_unlock_irqrestore(&s->lock, flags);
		return 1;
	}
	cur = READ_ONCE(ra->ra_pages);
	if (s->ra != ra)
		ra_claim(s, ra, index);
	/* a stream's accesses up to warmup_accesses, this one included */
	warm = s->accesses <= READ_ONCE(warmup_accesses);
	if (!warm && ra_holding(s, now)) {
		/* the default arm's value is stock, whatever stock is now */
		window = s->prev.arm == KMLBUS_ARM_MODEL ? s->prev.value : cur;
		goto apply;
	}
	if (s->held && s->prev.seq) {
		eff = ra_rate(s, now);
		prev = s->prev;
		report = true;
	}

	f[RA_F_SEQ] = s->seq;
	f[RA_F_REQ] = s->reqavg;
	f[RA_F_MMAP] = mmap ? RA_SCALE : 0;
	f[RA_F_JUMP] = s->jump;
	f[RA_F_STOCK] = min_t(unsigned int, cur, S32_MAX);

	if (kml_proxy_decide(ra_proxy, slot, f, &dec)) {
		s->held = false;
		spin_unlock_irqrestore(&s->lock, flags);
		return 1;
	}
	/* the default's value is cur itself; model values are clamped by kmlbus */
	window = dec.value;
	s->prev = dec;
	atomic64_inc(&ra_decisions);
	if (warm) {
		/* neither held nor reported: the first decision after warm-up holds */
		s->held = false;
		atomic64_inc(&ra_warmups);
	} else {
		s->held = true;
		s->progress = 0;
		s->t_ns = now;
	}
apply:
	s->busy = true;
	s->stock = cur;
	if (window != cur)
		WRITE_ONCE(ra->ra_pages, window);
	spin_unlock_irqrestore(&s->lock, flags);

	if (report)
		kml_proxy_report(ra_proxy, &prev, eff);
	call->ra = ra;
	call->slot = slot;
	atomic64_inc(&ra_windows);
	atomic64_add(ktime_get_ns() - now, &ra_decide_ns);
	return 0;
}

/* Count one access of stream @ra unless its slot is held by another stream's call. */
static void ra_note_access(struct file_ra_state *ra, pgoff_t index, unsigned long npages)
{
	struct ra_stream *s = &ra_streams[hash_ptr(ra, RA_HASH_BITS)];
	unsigned long flags;

	spin_lock_irqsave(&s->lock, flags);
	if (!READ_ONCE(ra_draining) && (!s->busy || s->ra == ra))
		ra_access(s, ra, index, npages);
	spin_unlock_irqrestore(&s->lock, flags);
}

/* ssize_t filemap_read(struct kiocb *iocb, struct iov_iter *iter, ssize_t already_read) */
static int ra_read_enter(struct kprobe *kp, struct pt_regs *regs)
{
	struct kiocb *iocb = (struct kiocb *)regs_get_kernel_argument(regs, 0);
	struct iov_iter *iter = (struct iov_iter *)regs_get_kernel_argument(regs, 1);
	struct file *file = iocb->ki_filp;
	size_t count = iov_iter_count(iter);
	loff_t pos = iocb->ki_pos;

	if (!file || !count || pos < 0 || !ra_in_scope(file->f_mapping))
		return 0;
	ra_note_access(&file->f_ra, pos >> PAGE_SHIFT,
		       ((pos + count - 1) >> PAGE_SHIFT) - (pos >> PAGE_SHIFT) + 1);
	return 0;
}

/*
 * void file_ra_state_init(struct file_ra_state *ra, struct address_space *mapping):
 * a file is being opened.  A stream a closed file left at this address ends,
 * so the file's first access starts its own (statistics, warm-up, period).
 * No call can be in flight on @ra: each pins its file, and this one is new.
 */
static int ra_open_enter(struct kprobe *kp, struct pt_regs *regs)
{
	struct file_ra_state *ra = (struct file_ra_state *)regs_get_kernel_argument(regs, 0);
	struct address_space *mapping =
		(struct address_space *)regs_get_kernel_argument(regs, 1);
	struct ra_stream *s;
	unsigned long flags;

	if (!ra_in_scope(mapping))
		return 0;
	s = &ra_streams[hash_ptr(ra, RA_HASH_BITS)];
	spin_lock_irqsave(&s->lock, flags);
	if (s->ra == ra)
		s->ra = NULL;	/* the next access claims the slot afresh */
	spin_unlock_irqrestore(&s->lock, flags);
	return 0;
}

static int ra_ractl_enter(struct kretprobe_instance *ri, struct readahead_control *ractl)
{
	struct ra_call *call = (struct ra_call *)ri->data;
	struct file *file = ractl->file;

	if (!file || ractl->ra != &file->f_ra || !ra_in_scope(ractl->mapping))
		return 1;
	call->pinned = NULL;
	return ra_enter(&file->f_ra, readahead_index(ractl), false, call);
}

/* void page_cache_sync_ra(struct readahead_control *ractl, unsigned long req_count) */
static int ra_sync_enter(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	return ra_ractl_enter(ri, (struct readahead_control *)regs_get_kernel_argument(regs, 0));
}

/* void page_cache_async_ra(struct readahead_control *ractl, struct folio *, unsigned long req_count) */
static int ra_async_enter(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	return ra_ractl_enter(ri, (struct readahead_control *)regs_get_kernel_argument(regs, 0));
}

/* vm_fault_t filemap_fault(struct vm_fault *vmf) */
static int ra_fault_enter(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct vm_fault *vmf = (struct vm_fault *)regs_get_kernel_argument(regs, 0);
	struct ra_call *call = (struct ra_call *)ri->data;
	struct file *file = vmf->vma->vm_file;
	struct folio *folio;
	bool sync;
	int ret;

	if (!file || !ra_in_scope(file->f_mapping))
		return 1;
	/* every fault is an access of the reader; only some reach readahead */
	ra_note_access(&file->f_ra, vmf->pgoff, 1);
	/* those that do: a missing page or the marker */
	rcu_read_lock();
	folio = xa_load(&file->f_mapping->i_pages, vmf->pgoff);
	sync = !folio || xa_is_value(folio);
	if (!sync && !folio_test_readahead(folio)) {
		rcu_read_unlock();
		return 1;
	}
	rcu_read_unlock();
	/* filemap_fault may drop mmap_lock: hold the file until it returns */
	call->pinned = get_file(file);
	ret = ra_enter(&file->f_ra, vmf->pgoff, true, call);
	if (ret) {
		fput(call->pinned);
		call->pinned = NULL;
	}
	return ret;
}

static int ra_return(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct ra_call *call = (struct ra_call *)ri->data;
	struct ra_stream *s = &ra_streams[call->slot];
	unsigned long flags;

	spin_lock_irqsave(&s->lock, flags);
	if (READ_ONCE(call->ra->ra_pages) != s->stock)
		WRITE_ONCE(call->ra->ra_pages, s->stock);
	s->busy = false;
	spin_unlock_irqrestore(&s->lock, flags);
	if (call->pinned)
		fput(call->pinned);
	return 0;
}

static struct kretprobe ra_sync_probe = {
	.kp.symbol_name	= "page_cache_sync_ra",
	.entry_handler	= ra_sync_enter,
	.handler	= ra_return,
	.data_size	= sizeof(struct ra_call),
	.maxactive	= RA_MAXACTIVE,
};

static struct kretprobe ra_async_probe = {
	.kp.symbol_name	= "page_cache_async_ra",
	.entry_handler	= ra_async_enter,
	.handler	= ra_return,
	.data_size	= sizeof(struct ra_call),
	.maxactive	= RA_MAXACTIVE,
};

static struct kretprobe ra_fault_probe = {
	.kp.symbol_name	= "filemap_fault",
	.entry_handler	= ra_fault_enter,
	.handler	= ra_return,
	.data_size	= sizeof(struct ra_call),
	.maxactive	= RA_MAXACTIVE,
};

static struct kretprobe *ra_probes[] = {
	&ra_sync_probe, &ra_async_probe, &ra_fault_probe,
};

/* Reads are counted as accesses; no return handler, nothing is changed. */
static struct kprobe ra_read_probe = {
	.symbol_name	= "filemap_read",
	.pre_handler	= ra_read_enter,
};

/* Opens begin streams; nothing is changed. */
static struct kprobe ra_open_probe = {
	.symbol_name	= "file_ra_state_init",
	.pre_handler	= ra_open_enter,
};

static struct kprobe *ra_kprobes[] = {
	&ra_read_probe, &ra_open_probe,
};

static s32 ra_default(struct kml_proxy *proxy, u32 key, const s32 *features)
{
	return features[RA_F_STOCK];
}

static const struct kml_proxy_ops ra_ops = {
	.default_decision = ra_default,
};

static const struct kml_proxy_desc ra_desc = {
	.name		= "readahead",
	.owner		= THIS_MODULE,
	.nkeys		= RA_STREAMS,
	.nfeatures	= RA_NFEATURES,
	.features	= {
		[RA_F_SEQ]	= { .name = "seq", .scale = RA_SCALE },
		[RA_F_REQ]	= { .name = "req_pages", .scale = RA_SCALE },
		[RA_F_MMAP]	= { .name = "mmap", .scale = RA_SCALE },
		[RA_F_JUMP]	= { .name = "jump_log2", .scale = RA_SCALE },
		[RA_F_STOCK]	= { .name = "stock_pages", .scale = 1 },
	},
	.recommendation	= {
		.name	= "window_pages",
		.scale	= 1,
		.min	= 0,
		.max	= RA_MAX_WINDOW,
	},
	.efficiency_scale = RA_SCALE,
	.ops		= &ra_ops,
};

static int __init ra_parse_devices(void)
{
	char *list, *cur, *name;
	int err = 0;

	if (!devices || !*devices) {
		pr_err("no devices given: load with devices=NAME[,NAME...] (e.g. devices=nullb0)\n");
		return -EINVAL;
	}
	list = kstrdup(devices, GFP_KERNEL);
	if (!list)
		return -ENOMEM;
	cur = list;
	while ((name = strsep(&cur, ",")) != NULL) {
		if (!*name)
			continue;
		if (ra_ndevs == RA_MAX_DEVICES ||
		    strscpy(ra_devs[ra_ndevs], name, DISK_NAME_LEN) < 0) {
			pr_err("devices=%s: at most %d names of under %d characters\n",
			       devices, RA_MAX_DEVICES, DISK_NAME_LEN);
			err = -EINVAL;
			break;
		}
		ra_ndevs++;
	}
	kfree(list);
	if (!err && !ra_ndevs) {
		pr_err("devices=%s names no device\n", devices);
		err = -EINVAL;
	}
	return err;
}

/* Wait until no call holds a window: each restores its file on return. */
static void ra_drain(void)
{
	unsigned long flags;
	bool busy;
	int i, ms;

	for (ms = 0; ms < RA_DRAIN_MS; ms++) {
		busy = false;
		for (i = 0; i < RA_STREAMS && !busy; i++) {
			spin_lock_irqsave(&ra_streams[i].lock, flags);
			busy = ra_streams[i].busy;
			spin_unlock_irqrestore(&ra_streams[i].lock, flags);
		}
		if (!busy)
			return;
		msleep(1);
	}
	pr_notice("calls still in flight after %d ms; unregistering anyway\n", RA_DRAIN_MS);
}

static int __init ra_init(void)
{
	struct kml_proxy *p;
	int i, err;

	err = ra_parse_devices();
	if (err)
		return err;
	ra_streams = kcalloc(RA_STREAMS, sizeof(*ra_streams), GFP_KERNEL);
	if (!ra_streams)
		return -ENOMEM;
	for (i = 0; i < RA_STREAMS; i++)
		spin_lock_init(&ra_streams[i].lock);

	p = kml_proxy_register(&ra_desc);
	if (IS_ERR(p)) {
		err = PTR_ERR(p);
		goto err_free;
	}
	ra_proxy = p;

	err = register_kprobes(ra_kprobes, ARRAY_SIZE(ra_kprobes));
	if (err) {
		pr_err("register_kprobes(%s, %s): %d\n", ra_read_probe.symbol_name,
		       ra_open_probe.symbol_name, err);
		goto err_destroy;
	}
	err = register_kretprobes(ra_probes, ARRAY_SIZE(ra_probes));
	if (err) {
		pr_err("register_kretprobes: %d\n", err);
		goto err_read;
	}
	pr_info("proxy %u started on %s\n", kml_proxy_id(p), devices);
	return 0;

err_read:
	unregister_kprobes(ra_kprobes, ARRAY_SIZE(ra_kprobes));
err_destroy:
	kml_proxy_destroy(p);
err_free:
	kfree(ra_streams);
	return err;
}

static void __exit ra_exit(void)
{
	int i;

	WRITE_ONCE(ra_draining, true);
	ra_drain();
	unregister_kretprobes(ra_probes, ARRAY_SIZE(ra_probes));
	unregister_kprobes(ra_kprobes, ARRAY_SIZE(ra_kprobes));
	for (i = 0; i < ARRAY_SIZE(ra_probes); i++)
		if (ra_probes[i]->nmissed)
			pr_info("%s: %d calls missed (maxactive %d)\n",
				ra_probes[i]->kp.symbol_name, ra_probes[i]->nmissed,
				RA_MAXACTIVE);
	kml_proxy_destroy(ra_proxy);
	kfree(ra_streams);
}

module_init(ra_init);
module_exit(ra_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmlbus proxy \"readahead\": per-stream readahead window in the page cache");
MODULE_SOFTDEP("pre: kmlbus");
