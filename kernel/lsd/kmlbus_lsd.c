// SPDX-License-Identifier: GPL-2.0
/*
 * kmlbus-lsd: a log-structured device-mapper target whose cleaner and data
 * placement are kmlbus decision points.
 *
 * Table line (lengths in 512-byte sectors, the logical size is the dm length):
 *
 *	<start> <len> kmlbus-lsd <dev> <segment_blocks> <streams>
 *		[<#opts> victim=greedy|cost-benefit placement=single|hot-cold]
 *
 * The backing device is cut into segments of <segment_blocks> 4 KiB blocks.
 * A page-level map sends each logical block to the physical block it was
 * last written to; every user write goes to the next free block of an open
 * segment of the stream the placement policy chose (<streams> user streams,
 * plus one stream for the cleaner's copies).  Over-provisioning is what the
 * device holds beyond the dm length; the table is refused unless the spare
 * covers the open segments and the cleaner's reserve.
 *
 * Why bios are remapped in map() rather than copied by a work item: the
 * target splits every bio at 4 KiB (dm_set_target_max_io_len) and exports a
 * 4 KiB logical block size, so each data bio is exactly one block and can
 * simply be pointed at its physical block.  Only writes that find no free
 * block (the device is truly full until the cleaner frees a segment) are
 * parked on a list that the cleaner resubmits; once one write is parked,
 * later ones queue behind it so the order of arrival is kept.
 *
 * The cleaner is a work item on the target's own WQ_MEM_RECLAIM workqueue:
 * it copies a victim's valid blocks with synchronous bios built on its stack
 * into one preallocated page, so it needs no memory to make progress.  It
 * waits only for the block layer (in-flight writes into the victim before
 * copying, in-flight reads from it before reuse); it never waits for user
 * space: kmlbus decisions are lock-free reads of the latest recommendation.
 *
 * Locking: lsd->lock (irq-safe spinlock) protects the maps, the segment
 * table, the free list, the open segments, the deferred list and the
 * counters.  Per-segment in-flight counts are atomics dropped in end_io
 * without the lock; whoever drops one to zero wakes drain_wq.
 *
 * Crash promise: none.  The map lives in memory only; after a reboot or a
 * table reload the device reads as zeros.
 */
#define DM_MSG_PREFIX "kmlbus-lsd"

#include <linux/bio.h>
#include <linux/device-mapper.h>
#include <linux/idr.h>
#include <linux/math64.h>
#include <linux/module.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/vmalloc.h>
#include <linux/wait.h>
#include <linux/workqueue.h>

#include <kmlbus/kmlbus.h>

#define LSD_SECTORS_PER_BLOCK	8		/* 4 KiB blocks */
#define LSD_BLOCK_SHIFT		3
#define LSD_NONE		U32_MAX
#define LSD_MAX_STREAMS		8
#define LSD_MIN_SEG_BLOCKS	8
#define LSD_MAX_SEG_BLOCKS	65536
#define LSD_GC_RESERVE		2	/* free segments only the cleaner may take */
#define LSD_HOT_MAX		255	/* saturating update counter */
#define LSD_PERMILLE		1000
#define LSD_SCORE_MAX		1000000000	/* victim scores are clamped to this */
#define LSD_PLACE_REGIONS	1024	/* placement keys: equal slices of the logical space */
#define LSD_VICTIM_CANDS	8	/* candidates scored per cleaning pass */
#define LSD_REGION_MAX		U16_MAX	/* saturating region write counter */

enum lsd_seg_state {
	LSD_SEG_FREE,
	LSD_SEG_OPEN,
	LSD_SEG_FULL,
	LSD_SEG_VICTIM,
};

enum lsd_victim_policy {
	LSD_VICTIM_GREEDY,
	LSD_VICTIM_COST_BENEFIT,
};

enum lsd_placement_policy {
	LSD_PLACE_SINGLE,
	LSD_PLACE_HOT_COLD,
};

static const char * const lsd_victim_names[] = {
	[LSD_VICTIM_GREEDY]		= "greedy",
	[LSD_VICTIM_COST_BENEFIT]	= "cost-benefit",
};

static const char * const lsd_placement_names[] = {
	[LSD_PLACE_SINGLE]	= "single",
	[LSD_PLACE_HOT_COLD]	= "hot-cold",
};

struct lsd_seg {
	u32 valid;		/* committed live blocks */
	u32 wp;			/* blocks handed out */
	u8 state;		/* enum lsd_seg_state */
	u8 stream;
	u64 mtime;		/* write clock of the last block handed out */
	u64 itime;		/* write clock of the last invalidation */
	u64 heat;		/* sum of the live blocks' update counts when written */
	struct list_head free_node;
	atomic_t writes;	/* bios in flight into this segment */
	atomic_t reads;		/* bios in flight out of this segment */
};

/* Per logical block: update frequency for hot/cold separation. */
struct lsd_lblk {
	u64 wtime;		/* write clock when last written */
	u32 epoch;		/* decay epoch of count */
	u8 count;		/* writes, halved every epoch */
	u8 wheat;		/* count when last written (its share of its segment's heat) */
	bool has_dec;		/* dec is the placement decision of the live version */
	struct kml_decision dec;
};

/*
 * Per placement region (key of lsd<N>.place): how recently and how often it
 * is written.  A region's counts halve every quarter of a logical size of
 * writes, four times as fast as a block's, so they follow a moving hot set
 * within a fraction of the time per-block counts need.
 */
struct lsd_region {
	u64 wtime;		/* write clock of its last write */
	u32 epoch;		/* decay epoch of count */
	u16 count;		/* writes, halved every epoch */
	bool written;		/* wtime is valid */
};

/* Victim features published to the bus (all fixed point, scale 1000 unless noted). */
enum {
	LSD_VF_VALID,		/* live blocks, permille of the segment */
	LSD_VF_AGE,		/* since the last block was written, permille of the logical size */
	LSD_VF_IDLE,		/* since the last invalidation, same unit */
	LSD_VF_HEAT,		/* mean update count of the live blocks */
	LSD_VF_STREAM,		/* stream that wrote it (scale 1; the cleaner's is <streams>) */
	LSD_VF_N,
};

/* Placement features: of the logical block being written. */
enum {
	LSD_PF_COUNT,		/* update count, halved every logical-size of writes (scale 1) */
	LSD_PF_AGE,		/* since its last write, permille of the logical size */
	LSD_PF_FIRST,		/* 1 if never written (or discarded) before (scale 1) */
	LSD_PF_RIDLE,		/* since the region's previous write, permille of the logical size */
	LSD_PF_RRATE,		/* region's decayed writes per block of the region, permille */
	LSD_PF_N,
};

/* The cleaner's snapshot of one candidate segment. */
struct lsd_cand {
	u32 seg;
	s32 f[LSD_VF_N];
};

enum lsd_io_kind {
	LSD_IO_NONE,
	LSD_IO_READ,
	LSD_IO_WRITE,
};

/* Per-bio data: which in-flight count end_io drops. */
struct lsd_io {
	u32 seg;
	u32 kind;
};

struct lsd {
	struct dm_target *ti;
	struct dm_dev *dev;

	u32 seg_blocks;
	u32 nr_segs;
	u32 nr_streams;		/* user streams; the cleaner uses index nr_streams */
	u32 nr_lblocks;
	u32 gc_low;		/* clean when fewer free segments than this */
	u32 gc_high;		/* ... until this many */
	enum lsd_victim_policy victim;
	enum lsd_placement_policy placement;

	spinlock_t lock;
	u32 *l2p;		/* logical -> physical block */
	u32 *p2l;		/* physical -> logical block, LSD_NONE if dead */
	struct lsd_lblk *lblk;
	struct lsd_region *region;	/* LSD_PLACE_REGIONS of them */
	struct lsd_seg *segs;
	struct list_head free_list;
	u32 nr_free;
	u32 open[LSD_MAX_STREAMS + 1];
	u64 wclock;		/* user blocks written: the target's clock */
	struct bio_list deferred;

	/* counters, reported by status */
	u64 user_writes;
	u64 gc_writes;
	u64 segs_cleaned;
	u64 discarded;
	u64 throttled;

	struct workqueue_struct *wq;
	struct work_struct gc_work;
	wait_queue_head_t drain_wq;
	struct page *gc_page;
	bool dying;

	/* kmlbus decision points; NULL where the table makes one pointless */
	int id;				/* lsd<id>.victim, lsd<id>.place */
	struct kml_proxy *victim_proxy;	/* NULL with more segments than keys */
	struct kml_proxy *place_proxy;	/* NULL with one stream */
	struct lsd_cand *cand;		/* only the cleaner touches it */
	u32 top[LSD_VICTIM_CANDS];	/* indexes into cand, best default score first */
	u64 arm_cleaned[KMLBUS_ARM_MAX + 1];	/* victims chosen per arm */
	u64 arm_moved[KMLBUS_ARM_MAX + 1];	/* blocks they cost */
	u64 place_arm[KMLBUS_ARM_MAX + 1];	/* placements per arm */
};

static DEFINE_IDA(lsd_ida);

static inline u32 lsd_seg_of(const struct lsd *lsd, u32 pblk)
{
	return pblk / lsd->seg_blocks;
}

/* Take a block from @stream's open segment, opening one if needed. */
static int lsd_alloc(struct lsd *lsd, u32 stream, u32 *pblk)
{
	bool gc = stream == lsd->nr_streams;
	u32 s = lsd->open[stream];
	struct lsd_seg *seg;

	lockdep_assert_held(&lsd->lock);
	if (s == LSD_NONE) {
		if (lsd->nr_free <= (gc ? 0 : LSD_GC_RESERVE))
			return -ENOSPC;
		seg = list_first_entry(&lsd->free_list, struct lsd_seg, free_node);
		list_del_init(&seg->free_node);
		lsd->nr_free--;
		s = seg - lsd->segs;
		seg->state = LSD_SEG_OPEN;
		seg->stream = stream;
		seg->wp = 0;
		seg->valid = 0;
		seg->heat = 0;
		seg->itime = lsd->wclock;
		lsd->open[stream] = s;
		if (lsd->nr_free < lsd->gc_low)
			queue_work(lsd->wq, &lsd->gc_work);
	}
	seg = &lsd->segs[s];
	*pblk = s * lsd->seg_blocks + seg->wp++;
	seg->mtime = lsd->wclock;
	if (seg->wp == lsd->seg_blocks) {
		seg->state = LSD_SEG_FULL;
		lsd->open[stream] = LSD_NONE;
	}
	return 0;
}

/* The block at @pblk no longer holds live data. */
static void lsd_invalidate(struct lsd *lsd, u32 pblk)
{
	struct lsd_seg *seg = &lsd->segs[lsd_seg_of(lsd, pblk)];

	lockdep_assert_held(&lsd->lock);
	seg->heat -= lsd->lblk[lsd->p2l[pblk]].wheat;
	lsd->p2l[pblk] = LSD_NONE;
	seg->valid--;
	seg->itime = lsd->wclock;
}

/* Hot/cold by update frequency: counts halve every nr_lblocks writes. */
static u32 lsd_touch(struct lsd *lsd, u32 lba)
{
	struct lsd_lblk *lb = &lsd->lblk[lba];
	u32 epoch = div_u64(lsd->wclock, lsd->nr_lblocks);
	u32 age = epoch - lb->epoch;

	lb->count = age >= 8 ? 0 : lb->count >> age;
	lb->epoch = epoch;
	if (lb->count < LSD_HOT_MAX)
		lb->count++;
	return lb->count;
}

static u32 lsd_place_default(const struct lsd *lsd, u32 count)
{
	switch (lsd->placement) {
	case LSD_PLACE_HOT_COLD:
		/* 1 write: stream 0, 2-3: stream 1, 4-7: stream 2, ... */
		return min_t(u32, lsd->nr_streams - 1, fls(count) - 1);
	case LSD_PLACE_SINGLE:
	default:
		return 0;
	}
}

static s32 lsd_place_default_cb(struct kml_proxy *proxy, u32 key, const s32 *f)
{
	return lsd_place_default(kml_proxy_priv(proxy), f[LSD_PF_COUNT]);
}

static s32 lsd_permille_of_capacity(const struct lsd *lsd, u64 ticks)
{
	return min_t(u64, div_u64(ticks * LSD_PERMILLE, lsd->nr_lblocks), S32_MAX);
}

/*
 * Placement feedback when a block dies: its ideal class is the one whose
 * lifetime band holds how long it lived (stream 0 for a logical size of
 * writes or more, each hotter stream half of the one before), and a class
 * off by the whole range of streams scores 0.
 */
static s32 lsd_place_efficiency(const struct lsd *lsd, u32 stream, u64 life)
{
	u64 band = lsd->nr_lblocks / 2;
	u32 ideal = 0;

	while (ideal < lsd->nr_streams - 1 && life < band) {
		ideal++;
		band >>= 1;
	}
	return LSD_PERMILLE - LSD_PERMILLE * abs((s32)stream - (s32)ideal) /
	       (s32)max(lsd->nr_streams - 1, 1U);
}

/* A live block described by @lb dies (overwritten or discarded): report its placement. */
static void lsd_block_died(struct lsd *lsd, const struct lsd_lblk *lb)
{
	if (lb->has_dec)
		kml_proxy_report(lsd->place_proxy, &lb->dec,
				 lsd_place_efficiency(lsd, lb->dec.value,
						      lsd->wclock - lb->wtime));
}

static u32 lsd_region_of(const struct lsd *lsd, u32 lba)
{
	return div_u64((u64)lba * LSD_PLACE_REGIONS, lsd->nr_lblocks);
}

/*
 * Region features before this write is counted: idle since its previous
 * write, and its decayed write count per block of the region.
 */
static void lsd_region_touch(struct lsd *lsd, u32 key, s32 *f)
{
	struct lsd_region *r = &lsd->region[key];
	u32 epoch = div_u64(lsd->wclock * 4, lsd->nr_lblocks);
	u32 age = epoch - r->epoch;
	u32 blocks = max_t(u32, lsd->nr_lblocks / LSD_PLACE_REGIONS, 1);

	r->count = age >= 16 ? 0 : r->count >> age;
	r->epoch = epoch;
	f[LSD_PF_RIDLE] = r->written ?
			  lsd_permille_of_capacity(lsd, lsd->wclock - r->wtime) : S32_MAX;
	f[LSD_PF_RRATE] = r->count * LSD_PERMILLE / blocks;
	if (r->count < LSD_REGION_MAX)
		r->count++;
	r->wtime = lsd->wclock;
	r->written = true;
}

static u32 lsd_place(struct lsd *lsd, u32 lba)
{
	struct lsd_lblk *lb = &lsd->lblk[lba];
	bool first = lsd->l2p[lba] == LSD_NONE;
	u64 since = lsd->wclock - lb->wtime;
	u32 count = lsd_touch(lsd, lba);
	u32 key = lsd_region_of(lsd, lba);
	s32 f[LSD_PF_N];

	lb->has_dec = false;
	if (!lsd->place_proxy)
		return lsd_place_default(lsd, count);
	f[LSD_PF_COUNT] = count;
	f[LSD_PF_AGE] = first ? S32_MAX : lsd_permille_of_capacity(lsd, since);
	f[LSD_PF_FIRST] = first;
	lsd_region_touch(lsd, key, f);
	if (kml_proxy_decide(lsd->place_proxy, key, f, &lb->dec))
		return lsd_place_default(lsd, count);
	lb->has_dec = true;
	lsd->place_arm[lb->dec.arm]++;
	return min_t(u32, lb->dec.value, lsd->nr_streams - 1);
}

/*
 * Give a user write its physical block and commit it to the map.  Returns
 * false when the device is full (only the cleaner's reserve is left).
 */
static bool lsd_map_write_locked(struct lsd *lsd, struct bio *bio, u32 lba)
{
	struct lsd_io *io = dm_per_bio_data(bio, sizeof(*io));
	struct lsd_region *region = &lsd->region[lsd_region_of(lsd, lba)];
	struct lsd_region rprev = *region;
	struct lsd_lblk prev;
	u32 stream, pblk, old;

	lockdep_assert_held(&lsd->lock);
	old = lsd->l2p[lba];
	prev = lsd->lblk[lba];
	stream = lsd_place(lsd, lba);
	if (lsd_alloc(lsd, stream, &pblk)) {
		/* parked: placed (and decided) again when it is resubmitted */
		if (lsd->lblk[lba].has_dec)
			lsd->place_arm[lsd->lblk[lba].dec.arm]--;
		lsd->lblk[lba] = prev;
		*region = rprev;
		return false;
	}
	if (old != LSD_NONE) {
		lsd_block_died(lsd, &prev);
		lsd_invalidate(lsd, old);
	}
	lsd->l2p[lba] = pblk;
	lsd->p2l[pblk] = lba;
	lsd->segs[lsd_seg_of(lsd, pblk)].valid++;
	lsd->lblk[lba].wheat = lsd->lblk[lba].count;
	lsd->segs[lsd_seg_of(lsd, pblk)].heat += lsd->lblk[lba].count;
	lsd->lblk[lba].wtime = lsd->wclock;
	lsd->wclock++;
	lsd->user_writes++;
	atomic_inc(&lsd->segs[lsd_seg_of(lsd, pblk)].writes);
	io->seg = lsd_seg_of(lsd, pblk);
	io->kind = LSD_IO_WRITE;
	bio_set_dev(bio, lsd->dev->bdev);
	bio->bi_iter.bi_sector = (sector_t)pblk << LSD_BLOCK_SHIFT;
	return true;
}

static u32 lsd_bio_lba(struct lsd *lsd, struct bio *bio)
{
	return dm_target_offset(lsd->ti, bio->bi_iter.bi_sector) >> LSD_BLOCK_SHIFT;
}

static int lsd_map_write(struct lsd *lsd, struct bio *bio)
{
	u32 lba = lsd_bio_lba(lsd, bio);
	unsigned long flags;
	bool placed = false;

	spin_lock_irqsave(&lsd->lock, flags);
	if (bio_list_empty(&lsd->deferred))
		placed = lsd_map_write_locked(lsd, bio, lba);
	if (!placed) {
		bio_list_add(&lsd->deferred, bio);
		lsd->throttled++;
		queue_work(lsd->wq, &lsd->gc_work);
	}
	spin_unlock_irqrestore(&lsd->lock, flags);
	return placed ? DM_MAPIO_REMAPPED : DM_MAPIO_SUBMITTED;
}

static int lsd_map_read(struct lsd *lsd, struct bio *bio)
{
	struct lsd_io *io = dm_per_bio_data(bio, sizeof(*io));
	u32 lba = lsd_bio_lba(lsd, bio);
	unsigned long flags;
	u32 pblk;

	spin_lock_irqsave(&lsd->lock, flags);
	pblk = lsd->l2p[lba];
	if (pblk != LSD_NONE) {
		io->seg = lsd_seg_of(lsd, pblk);
		io->kind = LSD_IO_READ;
		atomic_inc(&lsd->segs[io->seg].reads);
	}
	spin_unlock_irqrestore(&lsd->lock, flags);

	if (pblk == LSD_NONE) {
		zero_fill_bio(bio);
		bio_endio(bio);
		return DM_MAPIO_SUBMITTED;
	}
	bio_set_dev(bio, lsd->dev->bdev);
	bio->bi_iter.bi_sector = (sector_t)pblk << LSD_BLOCK_SHIFT;
	return DM_MAPIO_REMAPPED;
}

/* Discard: forget every whole block in the range; partial blocks are kept. */
static int lsd_map_discard(struct lsd *lsd, struct bio *bio)
{
	sector_t start = dm_target_offset(lsd->ti, bio->bi_iter.bi_sector);
	sector_t end = start + bio_sectors(bio);
	u64 first = DIV_ROUND_UP_ULL(start, LSD_SECTORS_PER_BLOCK);
	u64 last = end >> LSD_BLOCK_SHIFT;	/* exclusive */
	unsigned long flags;
	u64 lba;

	spin_lock_irqsave(&lsd->lock, flags);
	for (lba = first; lba < last; lba++) {
		u32 pblk = lsd->l2p[lba];

		if (!((lba - first + 1) % 1024)) {	/* bound the time irqs are off */
			spin_unlock_irqrestore(&lsd->lock, flags);
			spin_lock_irqsave(&lsd->lock, flags);
			pblk = lsd->l2p[lba];
		}
		if (pblk == LSD_NONE)
			continue;
		lsd_block_died(lsd, &lsd->lblk[lba]);
		lsd->lblk[lba].has_dec = false;
		lsd_invalidate(lsd, pblk);
		lsd->l2p[lba] = LSD_NONE;
		lsd->discarded++;
	}
	spin_unlock_irqrestore(&lsd->lock, flags);
	bio_endio(bio);
	return DM_MAPIO_SUBMITTED;
}

static int lsd_map(struct dm_target *ti, struct bio *bio)
{
	struct lsd_io *io = dm_per_bio_data(bio, sizeof(*io));
	struct lsd *lsd = ti->private;

	io->seg = LSD_NONE;
	io->kind = LSD_IO_NONE;
	if (bio_op(bio) == REQ_OP_DISCARD)
		return lsd_map_discard(lsd, bio);
	if (!bio_sectors(bio)) {	/* empty flush: the data lives below */
		bio_set_dev(bio, lsd->dev->bdev);
		return DM_MAPIO_REMAPPED;
	}
	if (bio_sectors(bio) != LSD_SECTORS_PER_BLOCK ||
	    (dm_target_offset(ti, bio->bi_iter.bi_sector) & (LSD_SECTORS_PER_BLOCK - 1))) {
		DMERR_LIMIT("bio of %u sectors at %llu is not one aligned 4 KiB block",
			    bio_sectors(bio), (unsigned long long)bio->bi_iter.bi_sector);
		return DM_MAPIO_KILL;
	}
	switch (bio_op(bio)) {
	case REQ_OP_READ:
		return lsd_map_read(lsd, bio);
	case REQ_OP_WRITE:
		return lsd_map_write(lsd, bio);
	default:
		return DM_MAPIO_KILL;
	}
}

static int lsd_end_io(struct dm_target *ti, struct bio *bio, blk_status_t *error)
{
	struct lsd_io *io = dm_per_bio_data(bio, sizeof(*io));
	struct lsd *lsd = ti->private;
	atomic_t *inflight;

	if (io->kind == LSD_IO_NONE)
		return DM_ENDIO_DONE;
	inflight = io->kind == LSD_IO_READ ? &lsd->segs[io->seg].reads :
					     &lsd->segs[io->seg].writes;
	io->kind = LSD_IO_NONE;
	if (atomic_dec_and_test(inflight))
		wake_up(&lsd->drain_wq);
	return DM_ENDIO_DONE;
}

/* Resubmit parked writes in arrival order while blocks can be had. */
static void lsd_kick_deferred(struct lsd *lsd)
{
	unsigned long flags;
	struct bio *bio;

	for (;;) {
		spin_lock_irqsave(&lsd->lock, flags);
		bio = bio_list_peek(&lsd->deferred);
		if (bio && !lsd_map_write_locked(lsd, bio, lsd_bio_lba(lsd, bio)))
			bio = NULL;
		if (bio)
			bio_list_pop(&lsd->deferred);
		spin_unlock_irqrestore(&lsd->lock, flags);
		if (!bio)
			return;
		dm_submit_bio_remap(bio, NULL);
	}
}

static void lsd_victim_features(const struct lsd *lsd, const struct lsd_seg *seg, s32 *f)
{
	f[LSD_VF_VALID] = seg->valid * LSD_PERMILLE / lsd->seg_blocks;
	f[LSD_VF_AGE] = lsd_permille_of_capacity(lsd, lsd->wclock - seg->mtime);
	f[LSD_VF_IDLE] = lsd_permille_of_capacity(lsd, lsd->wclock - seg->itime);
	f[LSD_VF_HEAT] = seg->valid ? div_u64(seg->heat * LSD_PERMILLE, seg->valid) : 0;
	f[LSD_VF_STREAM] = seg->stream;
}

/*
 * The human-made victim scores, from the published features (higher is
 * better): greedy = dead permille; cost-benefit (LFS) = (1 - u) * age / (1 + u).
 * A model's scores are compared with these, so they share the scale.
 */
static s32 lsd_victim_default(const struct lsd *lsd, const s32 *f)
{
	s64 dead = LSD_PERMILLE - f[LSD_VF_VALID];

	switch (lsd->victim) {
	case LSD_VICTIM_COST_BENEFIT:
		return min_t(s64, div_s64(dead * ((s64)f[LSD_VF_AGE] + 1) * LSD_PERMILLE,
					  LSD_PERMILLE + f[LSD_VF_VALID]), LSD_SCORE_MAX);
	case LSD_VICTIM_GREEDY:
	default:
		return dead;
	}
}

static s32 lsd_victim_default_cb(struct kml_proxy *proxy, u32 key, const s32 *f)
{
	return lsd_victim_default(kml_proxy_priv(proxy), f);
}

static bool lsd_victim_ok(const struct lsd *lsd, const struct lsd_seg *seg)
{
	return seg->state == LSD_SEG_FULL && seg->valid < lsd->seg_blocks;
}

static bool lsd_need_gc(const struct lsd *lsd)
{
	return !lsd->dying && (lsd->nr_free < lsd->gc_high || !bio_list_empty(&lsd->deferred));
}

/*
 * Keep in lsd->top the (at most LSD_VICTIM_CANDS) candidates with the best
 * default scores, best first; returns how many there are.
 */
static u32 lsd_top_candidates(struct lsd *lsd, u32 n)
{
	s32 score[LSD_VICTIM_CANDS];
	u32 i, j, k = 0;
	s32 sc;

	for (i = 0; i < n; i++) {
		sc = lsd_victim_default(lsd, lsd->cand[i].f);
		if (k == LSD_VICTIM_CANDS && sc <= score[k - 1])
			continue;
		j = k < LSD_VICTIM_CANDS ? k++ : k - 1;
		for (; j && score[j - 1] < sc; j--) {
			score[j] = score[j - 1];
			lsd->top[j] = lsd->top[j - 1];
		}
		score[j] = sc;
		lsd->top[j] = i;
	}
	return k;
}

/*
 * Choose the next victim and mark it LSD_SEG_VICTIM; LSD_NONE if there is
 * nothing to do.  The candidates (full segments with a dead block) are
 * snapshotted under the lock and scored outside it; the default's best
 * LSD_VICTIM_CANDS make the pass's bounded candidate set, so a pass
 * publishes at most that many samples whatever the device's size.
 *
 * One decision per pass says which arm chooses: the one made for the
 * default's favourite.  If the default decides it, that segment is the
 * victim and the other candidates are only published (telemetry, so the
 * bus learns their features and can score them).  If the model decides it,
 * the other candidates are decided too and the best score among those the
 * model decided wins: scores of the two arms are never compared.  The
 * winner's decision is the one credited and reported.  The winner is
 * revalidated under the lock; if it changed meanwhile the default chooses
 * again over all segments, unrecorded.
 */
static u32 lsd_choose_victim(struct lsd *lsd, struct kml_decision *dec, bool *has_dec)
{
	struct kml_proxy *proxy = lsd->victim_proxy;
	struct lsd_cand *c;
	struct kml_decision d;
	s32 score, best_score = 0;
	u32 i, n = 0, k, best, victim;
	unsigned long flags;
	bool model;

	*has_dec = false;
	spin_lock_irqsave(&lsd->lock, flags);
	if (lsd_need_gc(lsd)) {
		for (i = 0; i < lsd->nr_segs; i++) {
			if (!lsd_victim_ok(lsd, &lsd->segs[i]))
				continue;
			lsd->cand[n].seg = i;
			lsd_victim_features(lsd, &lsd->segs[i], lsd->cand[n].f);
			n++;
		}
	}
	spin_unlock_irqrestore(&lsd->lock, flags);
	if (!n)
		return LSD_NONE;

	k = lsd_top_candidates(lsd, n);
	best = lsd->top[0];
	if (proxy) {
		c = &lsd->cand[best];
		*has_dec = !kml_proxy_decide(proxy, c->seg, c->f, dec);
		model = *has_dec && dec->arm == KMLBUS_ARM_MODEL;
		for (i = 1; i < k; i++) {
			c = &lsd->cand[lsd->top[i]];
			if (!model) {
				kml_proxy_submit(proxy, c->seg, c->f);
				continue;
			}
			if (kml_proxy_decide(proxy, c->seg, c->f, &d) || d.arm != KMLBUS_ARM_MODEL)
				continue;
			if (d.value > dec->value) {
				best = lsd->top[i];
				*dec = d;
			}
		}
	}

	spin_lock_irqsave(&lsd->lock, flags);
	victim = lsd->cand[best].seg;
	if (!lsd_victim_ok(lsd, &lsd->segs[victim])) {
		*has_dec = false;
		victim = LSD_NONE;
		for (i = 0; i < lsd->nr_segs; i++) {
			s32 f[LSD_VF_N];

			if (!lsd_victim_ok(lsd, &lsd->segs[i]))
				continue;
			lsd_victim_features(lsd, &lsd->segs[i], f);
			score = lsd_victim_default(lsd, f);
			if (victim == LSD_NONE || score > best_score) {
				victim = i;
				best_score = score;
			}
		}
	}
	if (victim != LSD_NONE)
		lsd->segs[victim].state = LSD_SEG_VICTIM;
	spin_unlock_irqrestore(&lsd->lock, flags);
	return victim;
}

/* One synchronous 4 KiB bio to the backing device from the cleaner's page. */
static int lsd_gc_rw(struct lsd *lsd, u32 pblk, blk_opf_t opf)
{
	struct bio_vec bvec;
	struct bio bio;
	int err;

	bio_init(&bio, lsd->dev->bdev, &bvec, 1, opf);
	bio.bi_iter.bi_sector = (sector_t)pblk << LSD_BLOCK_SHIFT;
	__bio_add_page(&bio, lsd->gc_page, PAGE_SIZE, 0);
	err = submit_bio_wait(&bio);
	bio_uninit(&bio);
	return err;
}

/*
 * Move one live block out of the victim.  The map is checked again after
 * the copy: a user write or discard that got there first wins and the copy
 * is left dead.  Returns 1 if a block was moved, 0 if there was nothing to
 * move, or a negative errno.
 */
static int lsd_move_block(struct lsd *lsd, u32 pblk)
{
	unsigned long flags;
	u32 lba, dst, dseg;
	int err, moved = 0;

	spin_lock_irqsave(&lsd->lock, flags);
	lba = lsd->p2l[pblk];
	spin_unlock_irqrestore(&lsd->lock, flags);
	if (lba == LSD_NONE)
		return 0;

	err = lsd_gc_rw(lsd, pblk, REQ_OP_READ);
	if (err)
		return err;

	spin_lock_irqsave(&lsd->lock, flags);
	if (lsd->p2l[pblk] != lba) {
		spin_unlock_irqrestore(&lsd->lock, flags);
		return 0;
	}
	err = lsd_alloc(lsd, lsd->nr_streams, &dst);
	if (!err) {
		dseg = lsd_seg_of(lsd, dst);
		atomic_inc(&lsd->segs[dseg].writes);
	}
	spin_unlock_irqrestore(&lsd->lock, flags);
	if (err)
		return err;

	err = lsd_gc_rw(lsd, dst, REQ_OP_WRITE);

	spin_lock_irqsave(&lsd->lock, flags);
	if (!err && lsd->p2l[pblk] == lba && lsd->l2p[lba] == pblk) {
		lsd_invalidate(lsd, pblk);
		lsd->l2p[lba] = dst;
		lsd->p2l[dst] = lba;
		lsd->segs[dseg].valid++;
		lsd->segs[dseg].heat += lsd->lblk[lba].wheat;
		lsd->gc_writes++;
		moved = 1;
	}
	spin_unlock_irqrestore(&lsd->lock, flags);
	if (atomic_dec_and_test(&lsd->segs[dseg].writes))
		wake_up(&lsd->drain_wq);
	return err ? err : moved;
}

/* Clean one victim: move its live blocks, wait for readers, free it. */
static int lsd_clean(struct lsd *lsd, u32 victim, u32 *moved)
{
	struct lsd_seg *seg = &lsd->segs[victim];
	u32 base = victim * lsd->seg_blocks;
	unsigned long flags;
	u32 off;
	int ret;

	*moved = 0;
	/* The last blocks handed out may still be on their way to the disk. */
	wait_event(lsd->drain_wq, !atomic_read(&seg->writes));
	for (off = 0; off < lsd->seg_blocks; off++) {
		ret = lsd_move_block(lsd, base + off);
		if (ret < 0)
			goto fail;
		*moved += ret;
	}
	/* Nothing maps into the victim any more, so no new reads can start. */
	wait_event(lsd->drain_wq, !atomic_read(&seg->reads));

	spin_lock_irqsave(&lsd->lock, flags);
	seg->state = LSD_SEG_FREE;
	seg->wp = 0;
	list_add_tail(&seg->free_node, &lsd->free_list);
	lsd->nr_free++;
	lsd->segs_cleaned++;
	spin_unlock_irqrestore(&lsd->lock, flags);
	return 0;

fail:
	DMERR_LIMIT("%s: cleaning segment %u failed: %d; it stays in use",
		    dm_device_name(dm_table_get_md(lsd->ti->table)), victim, ret);
	spin_lock_irqsave(&lsd->lock, flags);
	seg->state = LSD_SEG_FULL;
	spin_unlock_irqrestore(&lsd->lock, flags);
	return ret;
}

static void lsd_gc_work(struct work_struct *work)
{
	struct lsd *lsd = container_of(work, struct lsd, gc_work);
	struct kml_decision dec;
	unsigned long flags;
	bool has_dec;
	u32 victim, moved;
	u8 arm;

	for (;;) {
		victim = lsd_choose_victim(lsd, &dec, &has_dec);
		if (victim == LSD_NONE)
			break;
		if (lsd_clean(lsd, victim, &moved))
			break;
		/* feedback: dead permille of the segment, what cleaning it won */
		if (has_dec)
			kml_proxy_report(lsd->victim_proxy, &dec,
					 (lsd->seg_blocks - moved) * LSD_PERMILLE / lsd->seg_blocks);
		arm = has_dec ? dec.arm : KMLBUS_ARM_DEFAULT;
		spin_lock_irqsave(&lsd->lock, flags);
		lsd->arm_cleaned[arm]++;
		lsd->arm_moved[arm] += moved;
		spin_unlock_irqrestore(&lsd->lock, flags);
		lsd_kick_deferred(lsd);
		cond_resched();
	}
	lsd_kick_deferred(lsd);
}

static int lsd_parse_opt(struct lsd *lsd, const char *opt, char **error)
{
	const char *val;
	int i;

	val = strchr(opt, '=');
	if (!val)
		goto bad;
	val++;
	if (!strncmp(opt, "victim=", val - opt)) {
		for (i = 0; i < ARRAY_SIZE(lsd_victim_names); i++)
			if (!strcmp(val, lsd_victim_names[i])) {
				lsd->victim = i;
				return 0;
			}
		DMERR("unknown victim policy '%s': expected greedy or cost-benefit", val);
		*error = "Unknown victim policy";
		return -EINVAL;
	}
	if (!strncmp(opt, "placement=", val - opt)) {
		for (i = 0; i < ARRAY_SIZE(lsd_placement_names); i++)
			if (!strcmp(val, lsd_placement_names[i])) {
				lsd->placement = i;
				return 0;
			}
		DMERR("unknown placement policy '%s': expected single or hot-cold", val);
		*error = "Unknown placement policy";
		return -EINVAL;
	}
bad:
	DMERR("unknown option '%s': expected victim=<greedy|cost-benefit> or placement=<single|hot-cold>",
	      opt);
	*error = "Unknown option";
	return -EINVAL;
}

static int lsd_parse(struct lsd *lsd, struct dm_arg_set *as, char **error)
{
	static const struct dm_arg seg_arg = {
		LSD_MIN_SEG_BLOCKS, LSD_MAX_SEG_BLOCKS,
		"Invalid segment size (4 KiB blocks, 8..65536)"
	};
	static const struct dm_arg streams_arg = {
		1, LSD_MAX_STREAMS, "Invalid number of streams (1..8)"
	};
	static const struct dm_arg nopts_arg = {
		0, 2, "Invalid number of optional arguments (0..2)"
	};
	unsigned int nopts;
	int err;

	err = dm_read_arg(&seg_arg, as, &lsd->seg_blocks, error);
	if (err)
		return err;
	err = dm_read_arg(&streams_arg, as, &lsd->nr_streams, error);
	if (err)
		return err;
	if (!as->argc)
		return 0;
	err = dm_read_arg_group(&nopts_arg, as, &nopts, error);
	if (err)
		return err;
	while (nopts--) {
		err = lsd_parse_opt(lsd, dm_shift_arg(as), error);
		if (err)
			return err;
	}
	if (as->argc) {
		*error = "Too many arguments";
		return -EINVAL;
	}
	return 0;
}

static const struct kml_proxy_ops lsd_victim_ops = {
	.default_decision	= lsd_victim_default_cb,
};

static const struct kml_proxy_ops lsd_place_ops = {
	.default_decision	= lsd_place_default_cb,
};

/*
 * The two decision points.  Victim keys are segment numbers, so the proxy
 * exists only when every segment has one; placement keys are 1024 equal
 * slices of the logical space, and one stream leaves nothing to decide.
 */
static int lsd_proxies(struct lsd *lsd, char **error)
{
	struct kml_proxy_desc desc = {
		.owner		= THIS_MODULE,
		.efficiency_scale = LSD_PERMILLE,
		.priv		= lsd,
	};
	char name[KMLBUS_NAME_LEN];

	if (lsd->nr_segs <= KMLBUS_MAX_KEYS) {
		snprintf(name, sizeof(name), "lsd%d.victim", lsd->id);
		desc.name = name;
		desc.nkeys = lsd->nr_segs;
		desc.nfeatures = LSD_VF_N;
		desc.features[LSD_VF_VALID] = (struct kml_field_desc){ "valid", LSD_PERMILLE };
		desc.features[LSD_VF_AGE] = (struct kml_field_desc){ "age", LSD_PERMILLE };
		desc.features[LSD_VF_IDLE] = (struct kml_field_desc){ "idle", LSD_PERMILLE };
		desc.features[LSD_VF_HEAT] = (struct kml_field_desc){ "heat", LSD_PERMILLE };
		desc.features[LSD_VF_STREAM] = (struct kml_field_desc){ "stream", 1 };
		desc.recommendation = (struct kml_rec_desc){
			"score", LSD_PERMILLE, 0, LSD_SCORE_MAX };
		desc.ops = &lsd_victim_ops;
		lsd->victim_proxy = kml_proxy_register(&desc);
		if (IS_ERR(lsd->victim_proxy)) {
			DMERR("cannot register kmlbus proxy %s: %ld", name,
			      PTR_ERR(lsd->victim_proxy));
			*error = "Cannot register the victim proxy";
			return PTR_ERR(lsd->victim_proxy);
		}
	} else {
		DMINFO("%u segments are more than kmlbus's %u keys: victims stay with the default",
		       lsd->nr_segs, KMLBUS_MAX_KEYS);
	}
	if (lsd->nr_streams < 2)
		return 0;

	memset(desc.features, 0, sizeof(desc.features));
	snprintf(name, sizeof(name), "lsd%d.place", lsd->id);
	desc.name = name;
	desc.nkeys = LSD_PLACE_REGIONS;
	desc.nfeatures = LSD_PF_N;
	desc.features[LSD_PF_COUNT] = (struct kml_field_desc){ "count", 1 };
	desc.features[LSD_PF_AGE] = (struct kml_field_desc){ "age", LSD_PERMILLE };
	desc.features[LSD_PF_FIRST] = (struct kml_field_desc){ "first", 1 };
	desc.features[LSD_PF_RIDLE] = (struct kml_field_desc){ "region_idle", LSD_PERMILLE };
	desc.features[LSD_PF_RRATE] = (struct kml_field_desc){ "region_rate", LSD_PERMILLE };
	desc.recommendation = (struct kml_rec_desc){ "stream", 1, 0, lsd->nr_streams - 1 };
	desc.ops = &lsd_place_ops;
	lsd->place_proxy = kml_proxy_register(&desc);
	if (IS_ERR(lsd->place_proxy)) {
		DMERR("cannot register kmlbus proxy %s: %ld", name, PTR_ERR(lsd->place_proxy));
		*error = "Cannot register the placement proxy";
		return PTR_ERR(lsd->place_proxy);
	}
	return 0;
}

static void lsd_free(struct lsd *lsd)
{
	if (lsd->wq)
		destroy_workqueue(lsd->wq);
	/* nothing decides any more: no I/O, no cleaner */
	kml_proxy_destroy(lsd->place_proxy);	/* NULL and ERR_PTR are ignored */
	kml_proxy_destroy(lsd->victim_proxy);
	if (lsd->id >= 0)
		ida_free(&lsd_ida, lsd->id);
	kvfree(lsd->cand);
	if (lsd->gc_page)
		__free_page(lsd->gc_page);
	kvfree(lsd->region);
	kvfree(lsd->segs);
	kvfree(lsd->lblk);
	kvfree(lsd->p2l);
	kvfree(lsd->l2p);
	if (lsd->dev)
		dm_put_device(lsd->ti, lsd->dev);
	kfree(lsd);
}

static int lsd_ctr(struct dm_target *ti, unsigned int argc, char **argv)
{
	struct dm_arg_set as = { .argc = argc, .argv = argv };
	u64 dev_blocks, spare, need;
	struct lsd *lsd;
	u32 i, nr_pblocks;
	int err;

	if (argc < 3) {
		ti->error = "Expected <dev> <segment_blocks> <streams> [<#opts> victim=... placement=...]";
		return -EINVAL;
	}
	if ((ti->begin | ti->len) & (LSD_SECTORS_PER_BLOCK - 1)) {
		ti->error = "Start and length must be multiples of 8 sectors (4 KiB)";
		return -EINVAL;
	}
	if (!ti->len || ti->len >> LSD_BLOCK_SHIFT >= LSD_NONE) {
		ti->error = "Length must be 1 to 2^32 - 2 blocks of 4 KiB";
		return -EINVAL;
	}

	lsd = kzalloc(sizeof(*lsd), GFP_KERNEL);
	if (!lsd) {
		ti->error = "Cannot allocate the target";
		return -ENOMEM;
	}
	lsd->ti = ti;
	lsd->id = -1;
	spin_lock_init(&lsd->lock);
	INIT_LIST_HEAD(&lsd->free_list);
	bio_list_init(&lsd->deferred);
	init_waitqueue_head(&lsd->drain_wq);
	INIT_WORK(&lsd->gc_work, lsd_gc_work);

	err = dm_get_device(ti, dm_shift_arg(&as), dm_table_get_mode(ti->table), &lsd->dev);
	if (err) {
		DMERR("cannot open backing device '%s': %d", argv[0], err);
		ti->error = "Cannot open the backing device";
		goto fail;
	}
	err = lsd_parse(lsd, &as, &ti->error);
	if (err)
		goto fail;

	lsd->nr_lblocks = ti->len >> LSD_BLOCK_SHIFT;
	dev_blocks = bdev_nr_sectors(lsd->dev->bdev) >> LSD_BLOCK_SHIFT;
	lsd->nr_segs = min_t(u64, div_u64(dev_blocks, lsd->seg_blocks),
			     LSD_NONE / lsd->seg_blocks - 1);
	/*
	 * Segments never available to user data: one open per stream, the
	 * cleaner's open one, its reserve, and one more so that a full device
	 * always leaves at least a segment's worth of dead blocks to reclaim.
	 */
	spare = lsd->nr_streams + 1 + LSD_GC_RESERVE + 1;
	need = (u64)lsd->nr_lblocks;
	if (lsd->nr_segs <= spare ||
	    need > (u64)(lsd->nr_segs - spare) * lsd->seg_blocks) {
		DMERR("%s holds %u segments of %u blocks; %llu logical blocks need at most %llu used segments plus %llu spare: shorten the table or use smaller segments or fewer streams",
		      lsd->dev->name, lsd->nr_segs, lsd->seg_blocks, need,
		      lsd->nr_segs > spare ? (u64)(lsd->nr_segs - spare) : 0ULL, spare);
		ti->error = "Backing device too small for this length (no over-provisioning left)";
		err = -EINVAL;
		goto fail;
	}
	lsd->gc_low = LSD_GC_RESERVE + 2;
	lsd->gc_high = lsd->gc_low + 2;
	nr_pblocks = lsd->nr_segs * lsd->seg_blocks;

	err = -ENOMEM;
	ti->error = "Cannot allocate the maps";
	lsd->l2p = kvmalloc_array(lsd->nr_lblocks, sizeof(*lsd->l2p), GFP_KERNEL);
	lsd->p2l = kvmalloc_array(nr_pblocks, sizeof(*lsd->p2l), GFP_KERNEL);
	lsd->lblk = kvcalloc(lsd->nr_lblocks, sizeof(*lsd->lblk), GFP_KERNEL);
	lsd->segs = kvcalloc(lsd->nr_segs, sizeof(*lsd->segs), GFP_KERNEL);
	lsd->region = kvcalloc(LSD_PLACE_REGIONS, sizeof(*lsd->region), GFP_KERNEL);
	lsd->cand = kvcalloc(lsd->nr_segs, sizeof(*lsd->cand), GFP_KERNEL);
	lsd->gc_page = alloc_page(GFP_KERNEL);
	if (!lsd->l2p || !lsd->p2l || !lsd->lblk || !lsd->segs || !lsd->region || !lsd->cand ||
	    !lsd->gc_page)
		goto fail;
	memset(lsd->l2p, 0xff, array_size(lsd->nr_lblocks, sizeof(*lsd->l2p)));
	memset(lsd->p2l, 0xff, array_size(nr_pblocks, sizeof(*lsd->p2l)));
	for (i = 0; i < lsd->nr_segs; i++) {
		lsd->segs[i].state = LSD_SEG_FREE;
		atomic_set(&lsd->segs[i].writes, 0);
		atomic_set(&lsd->segs[i].reads, 0);
		list_add_tail(&lsd->segs[i].free_node, &lsd->free_list);
	}
	lsd->nr_free = lsd->nr_segs;
	for (i = 0; i < ARRAY_SIZE(lsd->open); i++)
		lsd->open[i] = LSD_NONE;

	lsd->wq = alloc_workqueue("kmlbus-lsd-gc", WQ_MEM_RECLAIM | WQ_UNBOUND, 1);
	if (!lsd->wq) {
		ti->error = "Cannot allocate the cleaner's workqueue";
		goto fail;
	}

	lsd->id = ida_alloc(&lsd_ida, GFP_KERNEL);
	if (lsd->id < 0) {
		err = lsd->id;
		ti->error = "Cannot allocate an instance number";
		goto fail;
	}
	err = lsd_proxies(lsd, &ti->error);
	if (err)
		goto fail;

	err = dm_set_target_max_io_len(ti, LSD_SECTORS_PER_BLOCK);
	if (err) {
		ti->error = "Cannot set the 4 KiB split size";
		goto fail;
	}
	ti->num_flush_bios = 1;
	ti->num_discard_bios = 1;
	ti->discards_supported = true;
	ti->per_io_data_size = sizeof(struct lsd_io);
	ti->private = lsd;
	ti->error = NULL;
	return 0;

fail:
	lsd_free(lsd);
	return err;
}

static void lsd_dtr(struct dm_target *ti)
{
	struct lsd *lsd = ti->private;
	unsigned long flags;
	struct bio *bio;

	spin_lock_irqsave(&lsd->lock, flags);
	lsd->dying = true;
	spin_unlock_irqrestore(&lsd->lock, flags);
	cancel_work_sync(&lsd->gc_work);
	/* dm suspends (waits for all I/O) before it destroys a table */
	while ((bio = bio_list_pop(&lsd->deferred))) {
		bio->bi_status = BLK_STS_IOERR;
		bio_endio(bio);
	}
	lsd_free(lsd);
}

static void lsd_status(struct dm_target *ti, status_type_t type,
		       unsigned int status_flags, char *result, unsigned int maxlen)
{
	struct lsd *lsd = ti->private;
	u64 user, gc, cleaned, discarded, throttled, wa;
	u64 cleaned_arm[2], moved_arm[2], place_arm[2];
	unsigned long flags;
	unsigned int sz = 0;
	u32 nr_free, arm;

	switch (type) {
	case STATUSTYPE_INFO:
		spin_lock_irqsave(&lsd->lock, flags);
		user = lsd->user_writes;
		gc = lsd->gc_writes;
		cleaned = lsd->segs_cleaned;
		discarded = lsd->discarded;
		throttled = lsd->throttled;
		nr_free = lsd->nr_free;
		memcpy(cleaned_arm, lsd->arm_cleaned, sizeof(cleaned_arm));
		memcpy(moved_arm, lsd->arm_moved, sizeof(moved_arm));
		memcpy(place_arm, lsd->place_arm, sizeof(place_arm));
		spin_unlock_irqrestore(&lsd->lock, flags);
		/* write amplification in thousandths: (user + gc) / user */
		wa = user ? div64_u64((user + gc) * 1000, user) : 0;
		DMEMIT("user_writes=%llu gc_writes=%llu segs_cleaned=%llu wa=%llu.%03llu free_segs=%u/%u discarded=%llu throttled=%llu victim=%s placement=%s",
		       user, gc, cleaned, div_u64(wa, 1000), wa % 1000, nr_free,
		       lsd->nr_segs, discarded, throttled, lsd_victim_names[lsd->victim],
		       lsd_placement_names[lsd->placement]);
		/* per arm: victims cleaned and the blocks they cost, placements */
		DMEMIT(" cleaned_default=%llu moved_default=%llu cleaned_model=%llu moved_model=%llu placed_default=%llu placed_model=%llu",
		       cleaned_arm[KMLBUS_ARM_DEFAULT], moved_arm[KMLBUS_ARM_DEFAULT],
		       cleaned_arm[KMLBUS_ARM_MODEL], moved_arm[KMLBUS_ARM_MODEL],
		       place_arm[KMLBUS_ARM_DEFAULT], place_arm[KMLBUS_ARM_MODEL]);
		/* per victim arm: what its cleaning cost, (reclaimed + moved) / reclaimed */
		for (arm = 0; arm < ARRAY_SIZE(cleaned_arm); arm++) {
			u64 total = cleaned_arm[arm] * lsd->seg_blocks;

			wa = total > moved_arm[arm] ?
			     div64_u64(total * 1000, total - moved_arm[arm]) : 0;
			DMEMIT(" wa_%s=%llu.%03llu", arm == KMLBUS_ARM_MODEL ? "model" : "default",
			       div_u64(wa, 1000), wa % 1000);
		}
		if (lsd->victim_proxy)
			DMEMIT(" victim_proxy=lsd%d.victim", lsd->id);
		if (lsd->place_proxy)
			DMEMIT(" place_proxy=lsd%d.place", lsd->id);
		break;
	case STATUSTYPE_TABLE:
		DMEMIT("%s %u %u 2 victim=%s placement=%s", lsd->dev->name, lsd->seg_blocks,
		       lsd->nr_streams, lsd_victim_names[lsd->victim],
		       lsd_placement_names[lsd->placement]);
		break;
	case STATUSTYPE_IMA:
		*result = '\0';
		break;
	}
}

static int lsd_iterate_devices(struct dm_target *ti, iterate_devices_callout_fn fn, void *data)
{
	struct lsd *lsd = ti->private;

	return fn(ti, lsd->dev, 0,
		  (sector_t)lsd->nr_segs * lsd->seg_blocks << LSD_BLOCK_SHIFT, data);
}

static void lsd_io_hints(struct dm_target *ti, struct queue_limits *limits)
{
	limits->logical_block_size = LSD_SECTORS_PER_BLOCK << SECTOR_SHIFT;
	limits->physical_block_size = LSD_SECTORS_PER_BLOCK << SECTOR_SHIFT;
	limits->io_min = LSD_SECTORS_PER_BLOCK << SECTOR_SHIFT;
	limits->discard_granularity = LSD_SECTORS_PER_BLOCK << SECTOR_SHIFT;
	limits->max_discard_sectors = UINT_MAX >> SECTOR_SHIFT;
	limits->max_hw_discard_sectors = UINT_MAX >> SECTOR_SHIFT;
}

static struct target_type lsd_target = {
	.name		 = "kmlbus-lsd",
	.version	 = {0, 1, 0},
	.module		 = THIS_MODULE,
	.ctr		 = lsd_ctr,
	.dtr		 = lsd_dtr,
	.map		 = lsd_map,
	.end_io		 = lsd_end_io,
	.status		 = lsd_status,
	.iterate_devices = lsd_iterate_devices,
	.io_hints	 = lsd_io_hints,
};

static int __init lsd_init(void)
{
	int err = dm_register_target(&lsd_target);

	if (err)
		DMERR("cannot register the target: %d", err);
	return err;
}

static void __exit lsd_exit(void)
{
	dm_unregister_target(&lsd_target);
	ida_destroy(&lsd_ida);
}

module_init(lsd_init);
module_exit(lsd_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmlbus log-structured device-mapper target (kmlbus-lsd)");
MODULE_SOFTDEP("pre: kmlbus dm-mod");
