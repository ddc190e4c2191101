/* SPDX-License-Identifier: GPL-2.0 */
/*
 * kmlbus internals shared by the proxy core (kmlbus_core.c) and the generic
 * netlink handlers (kmlbus_nl.c).  Subsystems use <kmlbus/kmlbus.h> only.
 */
#ifndef _KMLBUS_INTERNAL_H
#define _KMLBUS_INTERNAL_H

#include <linux/atomic.h>
#include <linux/list.h>
#include <linux/mutex.h>
#include <linux/percpu.h>
#include <linux/rcupdate.h>
#include <linux/spinlock.h>
#include <linux/workqueue.h>
#include <net/genetlink.h>

#include <kmlbus/kmlbus.h>

#include "kmlbus_nl_gen.h"

/*
 * Buffering: bounded rings, flushed by count or by time.  The sizes
 * (KMLBUS_RING_*, KMLBUS_FLUSH_*, KMLBUS_MSG_*) are constants of the family
 * spec, in the uapi header: the bus sizes its buffers from the same numbers.
 * 32 * 64 B samples per message keep a message under 4 KiB.
 */
static_assert(KMLBUS_MSG_SAMPLES * sizeof(struct kmlbus_sample) <= 4096);
static_assert(!(KMLBUS_RING_SAMPLES & (KMLBUS_RING_SAMPLES - 1)) &&
	      !(KMLBUS_RING_FEEDBACK & (KMLBUS_RING_FEEDBACK - 1)));
#define KMLBUS_SWEEP_MS		1000	/* stale recommendation slots cleared */
#define KMLBUS_EVENTS		16	/* queued mode events; the oldest is lost */

/*
 * A bounded FIFO of fixed-size records, protected by kml_proxy.fb_lock (the
 * feedback ring; samples go to the per-CPU rings below).  cap is a power of
 * two (asserted below): indexes wrap with a mask.
 */
struct kml_ring {
	u8 *buf;
	u32 esize;
	u32 cap;
	u32 head;	/* index of the oldest record */
	u32 count;
};

/*
 * One CPU's share of a proxy's sample buffer: a single-producer,
 * single-consumer ring of KMLBUS_RING_SAMPLES records.  Only that CPU writes
 * it, with interrupts off (so a decision in an interrupt cannot interleave
 * with one it interrupted); the flush work drains it under flush_lock.  head
 * and tail run free (tail - head records are held): the producer publishes a
 * record with a release store of tail, the consumer frees slots with a
 * release store of head.
 */
struct kml_cpu {
	struct kmlbus_sample *buf;
	u32 tail;		/* producer: next slot to fill */
	u32 head;		/* consumer: oldest unsent record */
	u32 countdown;		/* decisions until the next sample (sample_period) */
};

/*
 * One mode change as announced: taken under mode_lock, so seq orders the
 * changes of one proxy; sent later from process context (event_work).
 */
struct kml_mode_event {
	u32 seq;
	u32 old;
	u32 mode;
	u32 reason;
};

/* One CPU's share of a proxy's counters, indexed by counters attribute. */
struct kml_counters {
	u64 c[KMLBUS_A_COUNTERS_MAX + 1];
};

/*
 * Laid out for the decision path: what every decision reads comes first and
 * is written only by control paths; what it writes is per CPU (cnt, cpu) or,
 * for recorded samples only, seq on its own cache line; locks and the
 * control state follow on lines of their own.
 */
struct kml_proxy {
	/* read-mostly: every decision reads these */
	struct kml_proxy_desc desc;	/* copy; names point at the arrays below */
	u32 mode;			/* READ_ONCE; written under mode_lock */
	int lifecycle;			/* enum kmlbus_lifecycle, READ_ONCE */
	u32 share;			/* permille, READ_ONCE */
	u32 explore;			/* permille, READ_ONCE */
	u32 sample_period;		/* 1..KMLBUS_MAX_SAMPLE_PERIOD, READ_ONCE */
	u32 id;
	/*
	 * Recommendation slots: value in the high 32 bits, expiry (low 32 bits
	 * of jiffies) in the low 32 bits; 0 = empty.  One u64 so a reader in
	 * any context sees value and expiry together without a lock.  Stale
	 * slots are swept (kmlbus_sweep) long before the expiry can wrap.
	 */
	u64 *slots;
	/* counters, per CPU: the decision path adds without a shared write */
	struct kml_counters __percpu *cnt;
	/* sample rings and sampling countdowns, per CPU */
	struct kml_cpu __percpu *cpu;

	/* written by every recorded sample (and only then): its own line */
	atomic64_t seq ____cacheline_aligned_in_smp;	/* last sample's seq */

	struct list_head node ____cacheline_aligned_in_smp; /* kmlbus_proxies, RCU */
	struct rcu_head rcu;
	char name[KMLBUS_NAME_LEN];
	char feature_names[KMLBUS_MAX_FEATURES][KMLBUS_NAME_LEN];
	char rec_name[KMLBUS_NAME_LEN];

	struct mutex lock;		/* lifecycle verbs */

	spinlock_t mode_lock;		/* serialises mode transitions */
	u32 reason;
	unsigned long mode_since;	/* jiffies */
	u32 mode_seq;			/* announced changes, under mode_lock */
	/* mode events not yet sent, oldest first, under mode_lock */
	struct kml_mode_event events[KMLBUS_EVENTS];
	u32 ev_head;
	u32 ev_count;
	struct work_struct event_work;	/* sends them, in order */

	u32 stale_ms;			/* 0 = never demote for staleness */
	unsigned long last_rec;		/* jiffies of the last recommend */

	u32 bus_portid;			/* 0 = no bus; cleared by cmpxchg */
	struct net *bus_net;		/* compared only, never dereferenced */

	/* feedback is rarer than samples: one shared ring under its own lock */
	spinlock_t fb_lock ____cacheline_aligned_in_smp;	/* irq-safe */
	struct kml_ring feedback;

	struct mutex flush_lock;	/* single consumer of every ring */
	struct delayed_work flush;
};

extern struct list_head kmlbus_proxies;
extern struct mutex kmlbus_reg_lock;
extern struct genl_family kmlbus_family;

/* Any context: this_cpu_add is safe against interrupts on the same CPU. */
static inline void kmlbus_count(struct kml_proxy *p, int counter, u64 n)
{
	this_cpu_add(p->cnt->c[counter], n);
}

/* The sum over all CPUs; concurrent adds may or may not be in it. */
static inline u64 kmlbus_counter(struct kml_proxy *p, int counter)
{
	u64 sum = 0;
	int cpu;

	for_each_possible_cpu(cpu)
		sum += READ_ONCE(per_cpu_ptr(p->cnt, cpu)->c[counter]);
	return sum;
}

/* Registry lookups; caller holds kmlbus_reg_lock. */
struct kml_proxy *kmlbus_find_by_id(u32 id);
struct kml_proxy *kmlbus_find_by_name(const char *name);

/* Mode gate.  @force skips the graph check (kernel fallback to emergency). */
int kmlbus_change_mode(struct kml_proxy *p, u32 mode, u32 reason, bool force);
int kmlbus_store_recs(struct kml_proxy *p, const struct kmlbus_rec *recs,
		      u32 n);

/* kmlbus_nl.c */
int kmlbus_nl_register(void);
void kmlbus_nl_unregister(void);
void kmlbus_nl_mode_event(struct kml_proxy *p, const struct kml_mode_event *ev);
void kmlbus_nl_removed_event(struct kml_proxy *p);

/* Does anyone listen to group telemetry?  Any context; inline: decide asks. */
static inline bool kmlbus_nl_telemetry_heard(void)
{
	return genl_has_listeners(&kmlbus_family, &init_net,
				  KMLBUS_NLGRP_TELEMETRY);
}

#endif /* _KMLBUS_INTERNAL_H */
