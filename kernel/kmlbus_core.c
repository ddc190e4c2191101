// SPDX-License-Identifier: GPL-2.0
/*
 * kmlbus core: proxy registry, lifecycle, the decision path, the mode gate,
 * telemetry/feedback buffering and the bus-release notifier.
 *
 * Locking:
 * - kmlbus_reg_lock (mutex) serialises registry changes and every netlink
 *   handler; the list is also walked under RCU by the release notifier.
 * - kml_proxy.lock (mutex) serialises the lifecycle verbs of one proxy.
 * - kml_proxy.mode_lock (irq-safe spinlock) serialises mode transitions,
 *   which come from handlers, the notifier, the stale check and subsystems,
 *   and guards the queue of mode events event_work sends.
 * - kml_proxy.fb_lock (irq-safe spinlock) guards the feedback ring.
 * - The decision path takes no lock: samples go to the deciding CPU's own
 *   ring (struct kml_cpu) with interrupts off, counters are per CPU, slots
 *   are read lock-free; the one shared write, seq, is made only for a
 *   sample actually recorded.
 * - kml_proxy.flush_lock (mutex) makes the flush the rings' only consumer.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include <linux/idr.h>
#include <linux/jiffies.h>
#include <linux/prandom.h>
#include <linux/random.h>
#include <linux/timekeeping.h>
#include <linux/netlink.h>
#include <linux/notifier.h>
#include <linux/mm.h>

#include "kmlbus_internal.h"
#include "kmlbus_modes_gen.h"
#include "kmlbus_nl_gen.h"

#define CREATE_TRACE_POINTS
#include "kmlbus_trace.h"

static_assert(sizeof(struct kmlbus_sample) == 64);
static_assert(sizeof(struct kmlbus_rec) == 12);
static_assert(sizeof(struct kmlbus_feedback) == 24);
/* one attribute per record, no padding: a message's records sit at a fixed stride */
static_assert(!(sizeof(struct kmlbus_sample) % NLA_ALIGNTO) &&
	      !(sizeof(struct kmlbus_feedback) % NLA_ALIGNTO));

LIST_HEAD(kmlbus_proxies);
DEFINE_MUTEX(kmlbus_reg_lock);
/*
 * Proxy ids are handed out cyclically (kmlbus_next_id, under
 * kmlbus_reg_lock): a destroyed proxy's id is not reused until the id space
 * wraps, so a bus that missed the destroy gets ENOENT for the old id instead
 * of reaching the next proxy created.
 */
static DEFINE_IDA(kmlbus_ida);
static u32 kmlbus_next_id = 1;

static int kmlbus_alloc_id(void)
{
	int id;

	lockdep_assert_held(&kmlbus_reg_lock);
	id = ida_alloc_range(&kmlbus_ida, kmlbus_next_id, INT_MAX, GFP_KERNEL);
	if (id == -ENOSPC && kmlbus_next_id > 1)
		id = ida_alloc_range(&kmlbus_ida, 1, kmlbus_next_id - 1,
				     GFP_KERNEL);
	if (id >= 0)
		kmlbus_next_id = id == INT_MAX ? 1 : id + 1;
	return id;
}

/* Samples per telemetry message (1 = one record per message). */
static unsigned int flush_batch = KMLBUS_MSG_SAMPLES;

static int flush_batch_set(const char *val, const struct kernel_param *kp)
{
	return param_set_uint_minmax(val, kp, 1, KMLBUS_MSG_SAMPLES);
}

static const struct kernel_param_ops flush_batch_ops = {
	.set	= flush_batch_set,
	.get	= param_get_uint,
};
module_param_cb(flush_batch, &flush_batch_ops, &flush_batch, 0644);
MODULE_PARM_DESC(flush_batch, "samples per telemetry message, 1..32 (default 32)");

/* ---- recommendation slots ------------------------------------------- */

static inline u64 slot_pack(s32 value, u32 ttl_ms)
{
	u32 exp = (u32)(jiffies + msecs_to_jiffies(ttl_ms));

	if (!exp)	/* 0 means empty */
		exp = 1;
	return ((u64)(u32)value << 32) | exp;
}

/*
 * Read slot @key: true and *value if fresh.  A stale slot is cleared and
 * counted as expired exactly once (whoever wins the cmpxchg counts).
 */
static bool slot_fresh(u64 s)
{
	return (s32)((u32)s - (u32)jiffies) > 0;
}

/* Clear stale slot @key if it still holds @s; the winner counts the expiry. */
static void slot_expire(struct kml_proxy *p, u32 key, u64 s)
{
	if (cmpxchg64(&p->slots[key], s, 0) == s)
		kmlbus_count(p, KMLBUS_A_COUNTERS_RECS_EXPIRED, 1);
}

static bool slot_read(struct kml_proxy *p, u32 key, s32 *value)
{
	u64 s = READ_ONCE(p->slots[key]);

	if (!s)
		return false;
	if (slot_fresh(s)) {
		*value = (s32)(u32)(s >> 32);
		return true;
	}
	slot_expire(p, key, s);
	return false;
}

/*
 * The expiry is 32 bits of jiffies: a slot nobody reads for 2^31 jiffies
 * (99 days at HZ=250) would look fresh again.  kmlbus_sweep clears every
 * proxy's stale slots each KMLBUS_SWEEP_MS, whatever its lifecycle, so no
 * slot gets that old.  Proxies are walked under RCU: kml_proxy_destroy
 * unlinks, waits for a grace period, then frees the slots.
 */
static void kmlbus_sweep_fn(struct work_struct *work);
static DECLARE_DELAYED_WORK(kmlbus_sweep, kmlbus_sweep_fn);

static void kmlbus_sweep_fn(struct work_struct *work)
{
	struct kml_proxy *p;
	u32 key;
	u64 s;

	rcu_read_lock();
	list_for_each_entry_rcu(p, &kmlbus_proxies, node) {
		for (key = 0; key < p->desc.nkeys; key++) {
			s = READ_ONCE(p->slots[key]);
			if (s && !slot_fresh(s))
				slot_expire(p, key, s);
		}
	}
	rcu_read_unlock();
	schedule_delayed_work(&kmlbus_sweep, msecs_to_jiffies(KMLBUS_SWEEP_MS));
}

int kmlbus_store_recs(struct kml_proxy *p, const struct kmlbus_rec *recs, u32 n)
{
	u32 i;

	for (i = 0; i < n; i++)
		WRITE_ONCE(p->slots[recs[i].key],
			   slot_pack(recs[i].value, recs[i].ttl_ms));
	WRITE_ONCE(p->last_rec, jiffies);
	kmlbus_count(p, KMLBUS_A_COUNTERS_RECS_RECEIVED, n);
	return 0;
}

/* ---- rings ---------------------------------------------------------- */

static int ring_alloc(struct kml_ring *r, u32 esize, u32 cap)
{
	r->buf = kvcalloc(cap, esize, GFP_KERNEL);
	if (!r->buf)
		return -ENOMEM;
	r->esize = esize;
	r->cap = cap;
	r->head = 0;
	r->count = 0;
	return 0;
}

static void ring_free(struct kml_ring *r)
{
	kvfree(r->buf);
	r->buf = NULL;
}

/* Slot for a new record or NULL if full; caller holds fb_lock. */
static void *ring_push(struct kml_ring *r)
{
	u32 idx;

	if (r->count == r->cap)
		return NULL;
	idx = (r->head + r->count) & (r->cap - 1);
	r->count++;
	return r->buf + (size_t)idx * r->esize;
}

/* Move the @n oldest records to @dst (or drop them if NULL). */
static void ring_pop(struct kml_ring *r, void *dst, u32 n)
{
	u32 first = min(n, r->cap - r->head);

	if (dst) {
		memcpy(dst, r->buf + (size_t)r->head * r->esize,
		       (size_t)first * r->esize);
		memcpy((u8 *)dst + (size_t)first * r->esize, r->buf,
		       (size_t)(n - first) * r->esize);
	}
	r->head = (r->head + n) & (r->cap - 1);
	r->count -= n;
}

/*
 * Move the @n oldest records of @r into @skb, one @attr attribute each
 * (YNL's multi-attr: generic clients decode them as a list), back to back,
 * so a reader can still view them as one array of stride 4 + esize.  The
 * skb was sized for them; caller holds fb_lock.
 */
static void ring_pop_attrs(struct kml_ring *r, struct sk_buff *skb, int attr,
			   u32 n)
{
	while (n--)
		ring_pop(r, nla_data(__nla_reserve(skb, attr, r->esize)), 1);
}

/* ---- flushing ------------------------------------------------------- */

/*
 * Account one multicast of @n records by its result.  netlink_broadcast()
 * returns 0 when some listener took the message, -ENOBUFS when a listener
 * that set NETLINK_BROADCAST_ERROR could not, and -ESRCH when nobody took
 * it: either nobody listens any more (unheard) or every listener's receive
 * buffer was full (send-failed; each of those sockets sees an overrun).
 */
static void kmlbus_count_sent(struct kml_proxy *p, u32 n, int err)
{
	if (!err)
		kmlbus_count(p, KMLBUS_A_COUNTERS_BATCHES, 1);
	else if (err == -ESRCH && !kmlbus_nl_telemetry_heard())
		kmlbus_count(p, KMLBUS_A_COUNTERS_UNHEARD, n);
	else
		kmlbus_count(p, KMLBUS_A_COUNTERS_SEND_FAILED, n);
}

/*
 * A message of @n records of @esize bytes each for @p, its id put, with
 * room for the drops counter; NULL on failure (the caller's records stay
 * where they are, for the next run).
 */
static struct sk_buff *batch_start(struct kml_proxy *p, u8 cmd, u32 n,
				   size_t esize, void **hdr)
{
	struct sk_buff *skb;

	skb = genlmsg_new(nla_total_size(sizeof(u32)) +
			  (size_t)n * nla_total_size(esize) +
			  nla_total_size_64bit(sizeof(u64)), GFP_KERNEL);
	if (!skb)
		return NULL;
	*hdr = genlmsg_put(skb, 0, 0, &kmlbus_family, 0, cmd);
	if (!*hdr || nla_put_u32(skb, KMLBUS_A_PROXY_ID, p->id)) {
		nlmsg_free(skb);
		return NULL;
	}
	return skb;
}

/*
 * Multicast a batch of @n records begun by batch_start(), telemetry with the
 * proxy's drops counter; a batch that cannot be finished is counted
 * send-failed, never lost silently.
 */
static void batch_send(struct kml_proxy *p, struct sk_buff *skb, void *hdr,
		       u32 n, bool drops)
{
	if (drops && nla_put_u64_64bit(skb, KMLBUS_A_PROXY_DROPS,
				       kmlbus_counter(p, KMLBUS_A_COUNTERS_DROPS),
				       KMLBUS_A_PROXY_PAD)) {
		nlmsg_free(skb);
		kmlbus_count(p, KMLBUS_A_COUNTERS_SEND_FAILED, n);
		return;
	}
	genlmsg_end(skb, hdr);
	kmlbus_count_sent(p, n, genlmsg_multicast(&kmlbus_family, skb, 0,
						  KMLBUS_NLGRP_TELEMETRY,
						  GFP_KERNEL));
}

/*
 * Send the feedback records the ring held when the call began, in messages
 * of at most KMLBUS_MSG_FEEDBACK records, or count them unheard when nobody
 * listens.  Records that arrive meanwhile wait for the next run, so a
 * producer that outpaces the sender cannot keep one run going (and the stale
 * check waiting).  Runs in process context under flush_lock, the ring's only
 * consumer.  Returns true if records are left.  Samples: flush_samples().
 */
static bool flush_feedback(struct kml_proxy *p)
{
	struct kml_ring *r = &p->feedback;
	unsigned long flags;
	struct sk_buff *skb;
	u32 n, budget;
	void *hdr;

	spin_lock_irqsave(&p->fb_lock, flags);
	budget = r->count;
	spin_unlock_irqrestore(&p->fb_lock, flags);

	while (budget) {
		spin_lock_irqsave(&p->fb_lock, flags);
		n = min3(r->count, (u32)KMLBUS_MSG_FEEDBACK, budget);
		if (n && !kmlbus_nl_telemetry_heard()) {
			ring_pop(r, NULL, n);
			spin_unlock_irqrestore(&p->fb_lock, flags);
			kmlbus_count(p, KMLBUS_A_COUNTERS_UNHEARD, n);
			budget -= n;
			continue;
		}
		spin_unlock_irqrestore(&p->fb_lock, flags);
		if (!n)
			break;

		/* count only grows meanwhile: we are the only consumer */
		skb = batch_start(p, KMLBUS_CMD_FEEDBACK, n, r->esize, &hdr);
		if (!skb)
			return false;	/* retried by the periodic flush */
		spin_lock_irqsave(&p->fb_lock, flags);
		ring_pop_attrs(r, skb, KMLBUS_A_PROXY_FEEDBACK, n);
		spin_unlock_irqrestore(&p->fb_lock, flags);
		budget -= n;
		batch_send(p, skb, hdr, n, false);
	}
	return READ_ONCE(r->count) != 0;
}

/*
 * Send the samples CPU @cpu's ring held when the call began, in messages of
 * at most @batch records, or count them unheard when nobody listens; as
 * flush_feedback(), newer records wait for the next run.  Caller holds
 * flush_lock.  Returns true if records are left.
 */
static bool flush_cpu_samples(struct kml_proxy *p, int cpu, u32 batch)
{
	struct kml_cpu *c = per_cpu_ptr(p->cpu, cpu);
	const size_t esize = sizeof(struct kmlbus_sample);
	struct sk_buff *skb;
	u32 head = c->head, budget, n, i;
	void *hdr;

	/* acquire: the records up to tail are written */
	budget = smp_load_acquire(&c->tail) - head;
	while (budget) {
		n = min(batch, budget);
		if (!kmlbus_nl_telemetry_heard()) {
			head += n;
			smp_store_release(&c->head, head);
			kmlbus_count(p, KMLBUS_A_COUNTERS_UNHEARD, n);
			budget -= n;
			continue;
		}
		skb = batch_start(p, KMLBUS_CMD_TELEMETRY, n, esize, &hdr);
		if (!skb)
			return false;	/* retried by the periodic flush */
		for (i = 0; i < n; i++)
			memcpy(nla_data(__nla_reserve(skb, KMLBUS_A_PROXY_RECORDS,
						      esize)),
			       &c->buf[(head + i) & (KMLBUS_RING_SAMPLES - 1)],
			       esize);
		/* release: the producer may reuse the slots once it sees head */
		head += n;
		smp_store_release(&c->head, head);
		budget -= n;
		batch_send(p, skb, hdr, n, true);
	}
	return READ_ONCE(c->tail) != head;
}

/* Every CPU's samples, a bounded run each; true if records are left. */
static bool flush_samples(struct kml_proxy *p, u32 batch)
{
	bool more = false;
	int cpu;

	for_each_possible_cpu(cpu)
		more |= flush_cpu_samples(p, cpu, batch);
	return more;
}

/* Drop every CPU's buffered samples uncounted (init); under flush_lock. */
static void drop_samples(struct kml_proxy *p)
{
	struct kml_cpu *c;
	int cpu;

	for_each_possible_cpu(cpu) {
		c = per_cpu_ptr(p->cpu, cpu);
		smp_store_release(&c->head, smp_load_acquire(&c->tail));
	}
}

static void free_cpu_rings(struct kml_proxy *p)
{
	int cpu;

	for_each_possible_cpu(cpu)
		kvfree(per_cpu_ptr(p->cpu, cpu)->buf);
	free_percpu(p->cpu);
}

/* Each CPU's ring on its own node; undone on failure. */
static int alloc_cpu_rings(struct kml_proxy *p)
{
	struct kml_cpu *c;
	int cpu;

	p->cpu = alloc_percpu(struct kml_cpu);
	if (!p->cpu)
		return -ENOMEM;
	for_each_possible_cpu(cpu) {
		c = per_cpu_ptr(p->cpu, cpu);
		c->buf = kvmalloc_node(array_size(KMLBUS_RING_SAMPLES,
						  sizeof(*c->buf)),
				       GFP_KERNEL | __GFP_ZERO, cpu_to_node(cpu));
		if (!c->buf) {
			free_cpu_rings(p);	/* kvfree(NULL) is a no-op */
			return -ENOMEM;
		}
	}
	return 0;
}

/* One bounded flush of every ring; true if records are left for another. */
static bool flush_now(struct kml_proxy *p)
{
	bool more;

	mutex_lock(&p->flush_lock);
	more = flush_samples(p, READ_ONCE(flush_batch));
	more |= flush_feedback(p);
	mutex_unlock(&p->flush_lock);
	return more;
}

static bool proxy_live(int lifecycle)
{
	return lifecycle == KMLBUS_LIFECYCLE_STARTED ||
	       lifecycle == KMLBUS_LIFECYCLE_RUNNING;
}

/* ---- mode gate ------------------------------------------------------ */

static void event_work_fn(struct work_struct *work)
{
	struct kml_proxy *p = container_of(work, struct kml_proxy, event_work);
	struct kml_mode_event ev;
	unsigned long flags;

	for (;;) {
		spin_lock_irqsave(&p->mode_lock, flags);
		if (!p->ev_count) {
			spin_unlock_irqrestore(&p->mode_lock, flags);
			return;
		}
		ev = p->events[p->ev_head];
		p->ev_head = (p->ev_head + 1) % KMLBUS_EVENTS;
		p->ev_count--;
		spin_unlock_irqrestore(&p->mode_lock, flags);
		kmlbus_nl_mode_event(p, &ev);
	}
}

/*
 * Apply a change with mode_lock held.  The change gets the next seq and is
 * traced and queued under the lock, so seq, trace and events follow the
 * order of the changes.  The event is sent from event_work: a mode change may
 * come from any context (a hard interrupt too), and a multicast may reach
 * dev_queue_xmit through a netlink tap.
 */
static int change_mode_locked(struct kml_proxy *p, u32 mode, u32 reason,
			      bool force)
{
	struct kml_mode_event *ev;
	u32 old = p->mode;

	lockdep_assert_held(&p->mode_lock);
	if (!force && !kmlbus_mode_allowed[old][mode])
		return -EINVAL;
	WRITE_ONCE(p->mode, mode);
	WRITE_ONCE(p->reason, reason);
	if (old != mode) {
		WRITE_ONCE(p->mode_since, jiffies);
		kmlbus_count(p, KMLBUS_A_COUNTERS_MODE_CHANGES, 1);
	}
	/* a forced fallback is announced even if already in emergency */
	if (old == mode && !force)
		return 0;
	WRITE_ONCE(p->mode_seq, p->mode_seq + 1);
	trace_kmlbus_mode_change(p->id, p->name, p->mode_seq, old, mode, reason);
	if (p->ev_count == KMLBUS_EVENTS) {	/* the seq gap shows the loss */
		p->ev_head = (p->ev_head + 1) % KMLBUS_EVENTS;
		p->ev_count--;
	}
	ev = &p->events[(p->ev_head + p->ev_count) % KMLBUS_EVENTS];
	ev->seq = p->mode_seq;
	ev->old = old;
	ev->mode = mode;
	ev->reason = reason;
	p->ev_count++;
	queue_work(system_wq, &p->event_work);
	return 0;
}

int kmlbus_change_mode(struct kml_proxy *p, u32 mode, u32 reason, bool force)
{
	unsigned long flags;
	int err;

	if (mode > KMLBUS_MODE_MAX || reason > KMLBUS_REASON_MAX)
		return -EINVAL;
	spin_lock_irqsave(&p->mode_lock, flags);
	err = change_mode_locked(p, mode, reason, force);
	spin_unlock_irqrestore(&p->mode_lock, flags);
	return err;
}

/*
 * Kernel-initiated demotion when the bus stopped recommending.  Decided
 * under mode_lock, so a mode change made meanwhile (the bus demoting to
 * learning, say) is seen and not overridden.
 */
static void check_stale(struct kml_proxy *p)
{
	u32 stale_ms = READ_ONCE(p->stale_ms);
	unsigned long flags, since;

	if (!stale_ms)
		return;
	spin_lock_irqsave(&p->mode_lock, flags);
	if (p->mode == KMLBUS_MODE_COLLABORATION ||
	    p->mode == KMLBUS_MODE_RECOMMENDATION) {
		since = READ_ONCE(p->last_rec);
		if (time_after(p->mode_since, since))
			since = p->mode_since;
		if (time_after(jiffies, since + msecs_to_jiffies(stale_ms)))
			change_mode_locked(p, KMLBUS_MODE_EMERGENCY,
					   KMLBUS_REASON_STALE, true);
	}
	spin_unlock_irqrestore(&p->mode_lock, flags);
}

static void flush_work_fn(struct work_struct *work)
{
	struct kml_proxy *p = container_of(to_delayed_work(work),
					   struct kml_proxy, flush);
	bool more;

	/* the safety net first: sending must not delay it */
	check_stale(p);
	more = flush_now(p);
	if (proxy_live(READ_ONCE(p->lifecycle)))
		queue_delayed_work(system_wq, &p->flush,
				   more ? 0 : msecs_to_jiffies(KMLBUS_FLUSH_MS));
}

/* ---- bus release ---------------------------------------------------- */

static int kmlbus_netlink_event(struct notifier_block *nb, unsigned long event,
				void *ptr)
{
	struct netlink_notify *n = ptr;
	struct kml_proxy *p;

	if (event != NETLINK_URELEASE || n->protocol != NETLINK_GENERIC ||
	    !n->portid)
		return NOTIFY_DONE;

	/*
	 * netlink_chain is a blocking notifier (process context), but the walk
	 * is under RCU, so nothing here may sleep.
	 */
	rcu_read_lock();
	list_for_each_entry_rcu(p, &kmlbus_proxies, node) {
		if (READ_ONCE(p->bus_portid) != n->portid ||
		    READ_ONCE(p->bus_net) != n->net)
			continue;
		if (cmpxchg(&p->bus_portid, n->portid, 0) != n->portid)
			continue;
		kmlbus_change_mode(p, KMLBUS_MODE_EMERGENCY,
				   KMLBUS_REASON_BUS_GONE, true);
	}
	rcu_read_unlock();
	return NOTIFY_DONE;
}

static struct notifier_block kmlbus_netlink_nb = {
	.notifier_call = kmlbus_netlink_event,
};

/* ---- owners going away --------------------------------------------- */

/*
 * A module whose exit did not destroy its proxies would leave flush work
 * queued on them and keep kmlbus unloadable forever after (or, once it is
 * gone, unloadable with work still pending): destroy what it left behind.
 * MODULE_STATE_GOING comes after the owner's exit (or its failed init), when
 * nothing of it calls the decision path any more.
 */
static int kmlbus_module_event(struct notifier_block *nb, unsigned long event,
			       void *data)
{
	struct module *mod = data;
	struct kml_proxy *p, *leaked;

	if (event != MODULE_STATE_GOING)
		return NOTIFY_DONE;
	for (;;) {
		leaked = NULL;
		mutex_lock(&kmlbus_reg_lock);
		list_for_each_entry(p, &kmlbus_proxies, node) {
			if (p->desc.owner == mod) {
				leaked = p;
				break;
			}
		}
		mutex_unlock(&kmlbus_reg_lock);
		if (!leaked)
			break;
		pr_err("module %s left proxy %s (id %u) behind: destroying it\n",
		       mod->name, leaked->name, leaked->id);
		kml_proxy_destroy(leaked);
	}
	return NOTIFY_DONE;
}

static struct notifier_block kmlbus_module_nb = {
	.notifier_call = kmlbus_module_event,
};

/* ---- registry ------------------------------------------------------- */

struct kml_proxy *kmlbus_find_by_id(u32 id)
{
	struct kml_proxy *p;

	lockdep_assert_held(&kmlbus_reg_lock);
	list_for_each_entry(p, &kmlbus_proxies, node)
		if (p->id == id)
			return p;
	return NULL;
}

struct kml_proxy *kmlbus_find_by_name(const char *name)
{
	struct kml_proxy *p;

	lockdep_assert_held(&kmlbus_reg_lock);
	list_for_each_entry(p, &kmlbus_proxies, node)
		if (!strncmp(p->name, name, KMLBUS_NAME_LEN))
			return p;
	return NULL;
}

static int desc_check(const struct kml_proxy_desc *d)
{
	u32 i;

	if (!d || !d->name || !d->name[0] ||
	    strnlen(d->name, KMLBUS_NAME_LEN) >= KMLBUS_NAME_LEN)
		return -EINVAL;
	if (!d->nkeys || d->nkeys > KMLBUS_MAX_KEYS ||
	    d->nfeatures > KMLBUS_MAX_FEATURES)
		return -EINVAL;
	if (!d->ops || !d->ops->default_decision)
		return -EINVAL;
	if (d->recommendation.min > d->recommendation.max ||
	    !d->recommendation.name ||
	    strnlen(d->recommendation.name, KMLBUS_NAME_LEN) >= KMLBUS_NAME_LEN)
		return -EINVAL;
	for (i = 0; i < d->nfeatures; i++)
		if (!d->features[i].name ||
		    strnlen(d->features[i].name, KMLBUS_NAME_LEN) >= KMLBUS_NAME_LEN)
			return -EINVAL;
	return 0;
}

/**
 * kml_proxy_create - register a proxy for a decision point (paper: create)
 * @desc: schema, default algorithm and callbacks; copied, may be on stack
 *
 * The proxy starts in the graph's initial mode (emergency), lifecycle
 * CREATED, visible to the bus but not yet deciding.
 * Return: the proxy or ERR_PTR(-EINVAL / -EEXIST / -ENOMEM / -ENOSPC).
 */
struct kml_proxy *kml_proxy_create(const struct kml_proxy_desc *desc)
{
	struct kml_proxy *p;
	u32 i;
	int err;

	err = desc_check(desc);
	if (err)
		return ERR_PTR(err);

	p = kzalloc(sizeof(*p), GFP_KERNEL);
	if (!p)
		return ERR_PTR(-ENOMEM);
	p->desc = *desc;
	strscpy(p->name, desc->name, sizeof(p->name));
	p->desc.name = p->name;
	strscpy(p->rec_name, desc->recommendation.name, sizeof(p->rec_name));
	p->desc.recommendation.name = p->rec_name;
	for (i = 0; i < desc->nfeatures; i++) {
		strscpy(p->feature_names[i], desc->features[i].name,
			sizeof(p->feature_names[i]));
		p->desc.features[i].name = p->feature_names[i];
	}
	mutex_init(&p->lock);
	mutex_init(&p->flush_lock);
	spin_lock_init(&p->mode_lock);
	spin_lock_init(&p->fb_lock);
	INIT_DELAYED_WORK(&p->flush, flush_work_fn);
	INIT_WORK(&p->event_work, event_work_fn);
	p->mode = KMLBUS_MODE_INITIAL;
	p->reason = KMLBUS_REASON_NONE;
	p->mode_since = jiffies;
	p->last_rec = jiffies;
	p->share = KMLBUS_DEFAULT_SHARE;
	p->explore = KMLBUS_DEFAULT_EXPLORE;
	p->sample_period = 1;
	atomic64_set(&p->seq, 0);

	err = -ENOMEM;
	p->cnt = alloc_percpu(struct kml_counters);
	if (!p->cnt)
		goto err_free;
	p->slots = kvcalloc(desc->nkeys, sizeof(*p->slots), GFP_KERNEL);
	if (!p->slots)
		goto err_cnt;
	err = alloc_cpu_rings(p);
	if (err)
		goto err_slots;
	err = ring_alloc(&p->feedback, sizeof(struct kmlbus_feedback),
			 KMLBUS_RING_FEEDBACK);
	if (err)
		goto err_samples;

	mutex_lock(&kmlbus_reg_lock);
	if (kmlbus_find_by_name(p->name)) {
		err = -EEXIST;
		goto err_unlock;
	}
	err = kmlbus_alloc_id();
	if (err < 0)
		goto err_unlock;
	p->id = err;
	WRITE_ONCE(p->lifecycle, KMLBUS_LIFECYCLE_CREATED);
	list_add_tail_rcu(&p->node, &kmlbus_proxies);
	mutex_unlock(&kmlbus_reg_lock);
	return p;

err_unlock:
	mutex_unlock(&kmlbus_reg_lock);
	ring_free(&p->feedback);
err_samples:
	free_cpu_rings(p);
err_slots:
	kvfree(p->slots);
err_cnt:
	free_percpu(p->cnt);
err_free:
	kfree(p);
	return ERR_PTR(err);
}
EXPORT_SYMBOL_GPL(kml_proxy_create);

/**
 * kml_proxy_init - (re)initialise: empty table and buffers (paper: init)
 * @proxy: a CREATED or STOPPED proxy
 * Return: 0 or -EBUSY when the proxy is started.
 */
int kml_proxy_init(struct kml_proxy *proxy)
{
	unsigned long flags;
	int lc, err = 0;
	u32 i;

	mutex_lock(&proxy->lock);
	lc = proxy->lifecycle;
	if (lc != KMLBUS_LIFECYCLE_CREATED && lc != KMLBUS_LIFECYCLE_STOPPED &&
	    lc != KMLBUS_LIFECYCLE_INITIALIZED) {
		err = -EBUSY;
		goto out;
	}
	for (i = 0; i < proxy->desc.nkeys; i++)
		WRITE_ONCE(proxy->slots[i], 0);
	mutex_lock(&proxy->flush_lock);
	drop_samples(proxy);
	spin_lock_irqsave(&proxy->fb_lock, flags);
	ring_pop(&proxy->feedback, NULL, proxy->feedback.count);
	spin_unlock_irqrestore(&proxy->fb_lock, flags);
	mutex_unlock(&proxy->flush_lock);
	WRITE_ONCE(proxy->lifecycle, KMLBUS_LIFECYCLE_INITIALIZED);
out:
	mutex_unlock(&proxy->lock);
	return err;
}
EXPORT_SYMBOL_GPL(kml_proxy_init);

/**
 * kml_proxy_start - start deciding and publishing (paper: start)
 * @proxy: an INITIALIZED or STOPPED proxy
 * Return: 0, or -EINVAL from any other state.
 */
int kml_proxy_start(struct kml_proxy *proxy)
{
	int lc, err = 0;

	mutex_lock(&proxy->lock);
	lc = proxy->lifecycle;
	if (lc != KMLBUS_LIFECYCLE_INITIALIZED && lc != KMLBUS_LIFECYCLE_STOPPED) {
		err = proxy_live(lc) ? 0 : -EINVAL;
		goto out;
	}
	WRITE_ONCE(proxy->lifecycle, KMLBUS_LIFECYCLE_STARTED);
	queue_delayed_work(system_wq, &proxy->flush,
			   msecs_to_jiffies(KMLBUS_FLUSH_MS));
out:
	mutex_unlock(&proxy->lock);
	return err;
}
EXPORT_SYMBOL_GPL(kml_proxy_start);

/**
 * kml_proxy_stop - stop publishing; decisions fall to the default (paper: stop)
 * @proxy: a started proxy
 *
 * Flushes what is buffered.  Sleeps.
 * Return: 0, or -EINVAL if the proxy was not started.
 */
int kml_proxy_stop(struct kml_proxy *proxy)
{
	int err = 0;

	mutex_lock(&proxy->lock);
	if (!proxy_live(proxy->lifecycle)) {
		err = proxy->lifecycle == KMLBUS_LIFECYCLE_STOPPED ? 0 : -EINVAL;
		goto out;
	}
	WRITE_ONCE(proxy->lifecycle, KMLBUS_LIFECYCLE_STOPPED);
	cancel_delayed_work_sync(&proxy->flush);
	flush_now(proxy);
out:
	mutex_unlock(&proxy->lock);
	return err;
}
EXPORT_SYMBOL_GPL(kml_proxy_stop);

static void proxy_free_rcu(struct rcu_head *rcu)
{
	struct kml_proxy *p = container_of(rcu, struct kml_proxy, rcu);

	kfree(p);
}

/**
 * kml_proxy_destroy - unregister and free (paper: destroy)
 * @proxy: the proxy; NULL and ERR_PTR values are ignored
 *
 * The caller must have stopped calling decide/report/submit.  Waits for
 * netlink handlers, the release notifier and the flush work, sends the
 * pending mode events, then a proxy-removed event.  Sleeps.
 */
void kml_proxy_destroy(struct kml_proxy *proxy)
{
	if (IS_ERR_OR_NULL(proxy))
		return;
	kml_proxy_stop(proxy);

	mutex_lock(&proxy->lock);
	WRITE_ONCE(proxy->lifecycle, KMLBUS_LIFECYCLE_SHUTTING_DOWN);
	mutex_unlock(&proxy->lock);

	mutex_lock(&kmlbus_reg_lock);
	list_del_rcu(&proxy->node);
	mutex_unlock(&kmlbus_reg_lock);
	synchronize_rcu();	/* notifier walkers are done with it */

	cancel_delayed_work_sync(&proxy->flush);
	flush_work(&proxy->event_work);	/* what was announced is sent */
	kmlbus_nl_removed_event(proxy);	/* ... before it is gone */
	mutex_lock(&kmlbus_reg_lock);
	ida_free(&kmlbus_ida, proxy->id);
	mutex_unlock(&kmlbus_reg_lock);
	ring_free(&proxy->feedback);
	free_cpu_rings(proxy);
	kvfree(proxy->slots);
	free_percpu(proxy->cnt);	/* RCU walkers count too: after the grace period */
	mutex_destroy(&proxy->flush_lock);
	mutex_destroy(&proxy->lock);
	call_rcu(&proxy->rcu, proxy_free_rcu);
}
EXPORT_SYMBOL_GPL(kml_proxy_destroy);

/**
 * kml_proxy_register - create, init and start a proxy in one call
 * @desc: as for kml_proxy_create()
 *
 * The usual way in for a subsystem; undone on failure.  Undo it with
 * kml_proxy_destroy() (which stops the proxy first).  Sleeps.
 * Return: a started proxy or an ERR_PTR() from any of the three verbs.
 */
struct kml_proxy *kml_proxy_register(const struct kml_proxy_desc *desc)
{
	struct kml_proxy *p;
	int err;

	p = kml_proxy_create(desc);
	if (IS_ERR(p))
		return p;
	err = kml_proxy_init(p);
	if (err)
		goto err_destroy;
	err = kml_proxy_start(p);
	if (err)
		goto err_destroy;
	return p;

err_destroy:
	kml_proxy_destroy(p);
	return ERR_PTR(err);
}
EXPORT_SYMBOL_GPL(kml_proxy_register);

/* ---- decision path (any context, never sleeps) ---------------------- */

/*
 * Does anyone listen to group telemetry, as this CPU looked in the current
 * jiffy?  genl_has_listeners() is three calls deep and the decision path asks
 * on every recorded decision; the answer changes when a socket joins or
 * leaves.  One word per CPU, (jiffies << 1) | heard, read with one this_cpu
 * op so an interrupt or a migration sees a consistent pair.  A listener that
 * just joined misses at most a jiffy of samples (counted unheard); samples
 * recorded after the last one left are counted unheard by the flush.
 */
static DEFINE_PER_CPU(unsigned long, kmlbus_heard);

static __always_inline bool telemetry_heard(void)
{
	unsigned long now = READ_ONCE(jiffies) << 1;
	unsigned long v = this_cpu_read(kmlbus_heard);
	bool heard;

	if (likely((v & ~1UL) == now))
		return v & 1;
	heard = kmlbus_nl_telemetry_heard();
	this_cpu_write(kmlbus_heard, now | heard);
	return heard;
}

/*
 * One in sample_period decisions is recorded: true if this one is not.
 * Each CPU counts down on its own (this_cpu ops are safe against interrupts
 * on the same CPU); a countdown left over from a larger period restarts.
 */
static __always_inline bool sampled_out(struct kml_proxy *p)
{
	u32 period = READ_ONCE(p->sample_period);
	u32 left;

	if (period <= 1)
		return false;
	left = this_cpu_dec_return(p->cpu->countdown);
	if ((s32)left > 0 && left < period)
		return true;
	this_cpu_write(p->cpu->countdown, period);
	return false;
}

/*
 * Append one sample to this CPU's ring; returns its seq, or 0 when the
 * sample is not recorded: not chosen by sample_period (counted unsampled),
 * nobody listens to group telemetry (counted unheard, nothing written), or
 * the ring is full (counted a drop).  seq is taken only for a recorded
 * sample, with interrupts off, so on each CPU seqs follow decision order.
 */
static __always_inline u64 record_sample(struct kml_proxy *p,
					 const struct kml_decision *d,
					 s32 shadow, const s32 *features)
{
	u32 nf = features ? p->desc.nfeatures : 0;
	struct kmlbus_sample *s;
	struct kml_cpu *c;
	unsigned long flags;
	u32 tail, held, i;
	u64 seq, ts;

	if (sampled_out(p)) {
		kmlbus_count(p, KMLBUS_A_COUNTERS_UNSAMPLED, 1);
		return 0;
	}
	if (!telemetry_heard()) {
		kmlbus_count(p, KMLBUS_A_COUNTERS_SAMPLES, 1);
		kmlbus_count(p, KMLBUS_A_COUNTERS_UNHEARD, 1);
		return 0;
	}

	ts = ktime_get_mono_fast_ns();
	local_irq_save(flags);
	c = this_cpu_ptr(p->cpu);
	tail = c->tail;
	/* acquire: the consumer is done with a slot before we reuse it */
	held = tail - smp_load_acquire(&c->head);
	if (unlikely(held >= KMLBUS_RING_SAMPLES)) {
		local_irq_restore(flags);
		kmlbus_count(p, KMLBUS_A_COUNTERS_DROPS, 1);
		return 0;
	}
	s = &c->buf[tail & (KMLBUS_RING_SAMPLES - 1)];
	seq = atomic64_inc_return(&p->seq);
	s->seq = seq;
	s->ts_ns = ts;
	s->key = d->key;
	s->decision = d->value;
	s->shadow = shadow;
	s->arm = d->arm;
	s->mode = d->mode;
	s->flags = d->flags;
	for (i = 0; i < KMLBUS_MAX_FEATURES; i++)
		s->features[i] = i < nf ? features[i] : 0;
	/* release: the record is complete before the consumer sees it */
	smp_store_release(&c->tail, tail + 1);
	local_irq_restore(flags);

	kmlbus_count(p, KMLBUS_A_COUNTERS_SAMPLES, 1);
	if (held + 1 == KMLBUS_FLUSH_COUNT)
		mod_delayed_work(system_wq, &p->flush, 0);
	return seq;
}

/*
 * The split between arms (collaboration share, learning exploration) needs
 * a uniform draw, not secrecy: a per-CPU Tausworthe generator, seeded from
 * get_random_u64() at load, costs a few instructions where
 * get_random_u32_below() takes the batched-entropy lock.  Preemption is off
 * around a draw; an interrupt that decides on the same CPU meanwhile only
 * shares a step of the sequence.
 */
static DEFINE_PER_CPU(struct rnd_state, kmlbus_rnd);

static bool permille_hit(u32 permille)
{
	u32 r;

	if (!permille)
		return false;
	if (permille >= KMLBUS_PERMILLE)
		return true;
	r = prandom_u32_state(get_cpu_ptr(&kmlbus_rnd));
	put_cpu_ptr(&kmlbus_rnd);
	return ((u64)r * KMLBUS_PERMILLE >> 32) < permille;
}

/**
 * kml_proxy_decide - make one decision (paper: apply_recommendation)
 * @proxy: the proxy
 * @key: recommendation slot, < nkeys
 * @features: nfeatures fixed-point features (may be NULL if nfeatures is 0)
 * @out: the decision; out->value is what the caller must use
 *
 * Reads the slot lock-free and decides by mode; records a telemetry sample
 * while the proxy is started.  Never sleeps; any context.
 * Return: 0, or -EINVAL for a key >= nkeys (then @out is zeroed and the
 * caller must fall back on its own default).
 */
int kml_proxy_decide(struct kml_proxy *proxy, u32 key, const s32 *features,
		     struct kml_decision *out)
{
	const struct kml_rec_desc *rd = &proxy->desc.recommendation;
	bool fresh, use = false;
	s32 def, mval = 0, shadow = 0;
	int lc;

	memset(out, 0, sizeof(*out));
	if (unlikely(key >= proxy->desc.nkeys))
		return -EINVAL;

	def = proxy->desc.ops->default_decision(proxy, key, features);
	out->key = key;
	out->value = def;
	out->arm = KMLBUS_ARM_DEFAULT;
	out->mode = READ_ONCE(proxy->mode);

	lc = READ_ONCE(proxy->lifecycle);
	if (!proxy_live(lc))
		return 0;	/* not started: the default, unrecorded */
	if (lc == KMLBUS_LIFECYCLE_STARTED)
		cmpxchg(&proxy->lifecycle, KMLBUS_LIFECYCLE_STARTED,
			KMLBUS_LIFECYCLE_RUNNING);

	fresh = slot_read(proxy, key, &mval);
	if (fresh) {
		if (mval < rd->min || mval > rd->max) {
			mval = clamp(mval, rd->min, rd->max);
			out->flags |= KMLBUS_SAMPLE_FLAGS_CLAMPED;
			kmlbus_count(proxy, KMLBUS_A_COUNTERS_RECS_CLAMPED, 1);
		}
		shadow = mval;
		out->flags |= KMLBUS_SAMPLE_FLAGS_HAS_SHADOW;
	}

	switch (out->mode) {
	case KMLBUS_MODE_EMERGENCY:
		if (fresh)
			kmlbus_count(proxy, KMLBUS_A_COUNTERS_RECS_IGNORED, 1);
		break;
	case KMLBUS_MODE_LEARNING:
		if (fresh && permille_hit(READ_ONCE(proxy->explore))) {
			use = true;
			out->flags |= KMLBUS_SAMPLE_FLAGS_EXPLORED;
		}
		break;
	case KMLBUS_MODE_COLLABORATION:
		use = fresh && permille_hit(READ_ONCE(proxy->share));
		break;
	case KMLBUS_MODE_RECOMMENDATION:
		use = fresh;
		break;
	}

	if (use) {
		out->value = proxy->desc.ops->apply ?
			     proxy->desc.ops->apply(proxy, key, mval) : mval;
		out->arm = KMLBUS_ARM_MODEL;
		kmlbus_count(proxy, KMLBUS_A_COUNTERS_DECISIONS_MODEL, 1);
		kmlbus_count(proxy, KMLBUS_A_COUNTERS_RECS_APPLIED, 1);
	} else {
		kmlbus_count(proxy, KMLBUS_A_COUNTERS_DECISIONS_DEFAULT, 1);
	}

	out->seq = record_sample(proxy, out, shadow, features);
	if (use)
		trace_kmlbus_rec_applied(proxy->id, out->seq, key, mval, out->value);
	return 0;
}
EXPORT_SYMBOL_GPL(kml_proxy_decide);

/**
 * kml_proxy_submit - telemetry-only sample (paper: publish_data)
 * @proxy: the proxy
 * @key: slot the sample describes
 * @features: the features
 *
 * Records the default's answer as a sample without deciding anything.
 * Return: 0, -EINVAL for a bad key, -EAGAIN if the proxy is not started.
 */
int kml_proxy_submit(struct kml_proxy *proxy, u32 key, const s32 *features)
{
	struct kml_decision d = { .key = key, .arm = KMLBUS_ARM_DEFAULT };

	if (unlikely(key >= proxy->desc.nkeys))
		return -EINVAL;
	if (!proxy_live(READ_ONCE(proxy->lifecycle)))
		return -EAGAIN;
	d.value = proxy->desc.ops->default_decision(proxy, key, features);
	d.mode = READ_ONCE(proxy->mode);
	record_sample(proxy, &d, 0, features);
	return 0;
}
EXPORT_SYMBOL_GPL(kml_proxy_submit);

/**
 * kml_proxy_report - report a decision's efficiency (paper: error_backpropagation)
 * @proxy: the proxy
 * @dec: the decision, as returned by kml_proxy_decide()
 * @efficiency: fixed point, efficiency_scale units, higher is better
 *
 * Never sleeps; any context.
 * Return: 0, -ENOSPC if the feedback buffer was full (counted), -EAGAIN if
 * the proxy is not started.
 */
int kml_proxy_report(struct kml_proxy *proxy, const struct kml_decision *dec,
		     s32 efficiency)
{
	struct kmlbus_feedback *f;
	unsigned long flags;

	if (!proxy_live(READ_ONCE(proxy->lifecycle)))
		return -EAGAIN;
	if (!telemetry_heard()) {	/* as record_sample */
		kmlbus_count(proxy, KMLBUS_A_COUNTERS_FEEDBACK, 1);
		kmlbus_count(proxy, KMLBUS_A_COUNTERS_UNHEARD, 1);
		return 0;
	}
	spin_lock_irqsave(&proxy->fb_lock, flags);
	f = ring_push(&proxy->feedback);
	if (f) {
		f->seq = dec->seq;
		f->key = dec->key;
		f->decision = dec->value;
		f->efficiency = efficiency;
		f->arm = dec->arm;
		memset(f->pad, 0, sizeof(f->pad));
	}
	spin_unlock_irqrestore(&proxy->fb_lock, flags);
	if (!f) {
		kmlbus_count(proxy, KMLBUS_A_COUNTERS_FEEDBACK_DROPS, 1);
		return -ENOSPC;
	}
	kmlbus_count(proxy, KMLBUS_A_COUNTERS_FEEDBACK, 1);
	return 0;
}
EXPORT_SYMBOL_GPL(kml_proxy_report);

/**
 * kml_proxy_evaluate - estimate a decision's efficiency and report it
 * (paper: estimate_efficiency)
 * @proxy: the proxy
 * @dec: the decision
 *
 * Return: as kml_proxy_report(), or -EOPNOTSUPP without estimate_efficiency.
 */
int kml_proxy_evaluate(struct kml_proxy *proxy, const struct kml_decision *dec)
{
	if (!proxy->desc.ops->estimate_efficiency)
		return -EOPNOTSUPP;
	return kml_proxy_report(proxy, dec,
				proxy->desc.ops->estimate_efficiency(proxy, dec));
}
EXPORT_SYMBOL_GPL(kml_proxy_evaluate);

/**
 * kml_proxy_set_mode - move to another mode (paper: correct_system_state)
 * @proxy: the proxy
 * @mode: enum kmlbus_mode
 * @reason: enum kmlbus_reason
 *
 * Checked against the mode graph; announces a mode-event.  Never sleeps.
 * Return: 0 or -EINVAL (unknown mode/reason, or a move the graph forbids).
 */
int kml_proxy_set_mode(struct kml_proxy *proxy, u32 mode, u32 reason)
{
	return kmlbus_change_mode(proxy, mode, reason, false);
}
EXPORT_SYMBOL_GPL(kml_proxy_set_mode);

u32 kml_proxy_id(const struct kml_proxy *proxy)
{
	return proxy->id;
}
EXPORT_SYMBOL_GPL(kml_proxy_id);

u32 kml_proxy_mode(const struct kml_proxy *proxy)
{
	return READ_ONCE(proxy->mode);
}
EXPORT_SYMBOL_GPL(kml_proxy_mode);

void *kml_proxy_priv(const struct kml_proxy *proxy)
{
	return proxy->desc.priv;
}
EXPORT_SYMBOL_GPL(kml_proxy_priv);

/* ---- module --------------------------------------------------------- */

static int __init kmlbus_init(void)
{
	int err, cpu;

	for_each_possible_cpu(cpu)
		prandom_seed_state(per_cpu_ptr(&kmlbus_rnd, cpu), get_random_u64());
	/*
	 * The registry is static; then the owners' notifier, the release
	 * notifier, then the family.
	 */
	err = register_module_notifier(&kmlbus_module_nb);
	if (err)
		return err;
	err = netlink_register_notifier(&kmlbus_netlink_nb);
	if (err)
		goto err_module_nb;
	err = kmlbus_nl_register();
	if (err)
		goto err_netlink_nb;
	schedule_delayed_work(&kmlbus_sweep, msecs_to_jiffies(KMLBUS_SWEEP_MS));
	return 0;

err_netlink_nb:
	netlink_unregister_notifier(&kmlbus_netlink_nb);
err_module_nb:
	unregister_module_notifier(&kmlbus_module_nb);
	return err;
}

static void __exit kmlbus_exit(void)
{
	cancel_delayed_work_sync(&kmlbus_sweep);
	kmlbus_nl_unregister();
	netlink_unregister_notifier(&kmlbus_netlink_nb);
	unregister_module_notifier(&kmlbus_module_nb);
	/* owners hold symbol references to us and their leftovers are gone */
	WARN_ON(!list_empty(&kmlbus_proxies));
	rcu_barrier();	/* proxy_free_rcu callbacks */
	ida_destroy(&kmlbus_ida);
}

module_init(kmlbus_init);
module_exit(kmlbus_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmlbus: kernel model proxies with a generic netlink bus");
MODULE_ALIAS_GENL_FAMILY(KMLBUS_FAMILY_NAME);
