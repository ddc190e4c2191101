// SPDX-License-Identifier: GPL-2.0
/*
 * kmlbus_sample: a synthetic readahead-like decision point for kmlbus.
 *
 * 64 streams, each with a hidden sequentiality s_k (permille).  Every
 * decision picks a stream and observes noisy features of it:
 *   f0 seq_ratio  s_k + noise, in [0, 1000]          (scale 1000)
 *   f1 req_size   request size in [1, 64] pages * 1000 (scale 1000)
 *   f2 noise      uniform in [0, 1000], uninformative  (scale 1000)
 * The decision is a readahead window in pages, [1, 64].  The optimal window
 * is w* = 1 + round(63 * s_k / 1000); the default heuristic is a fixed 8.
 * Efficiency (scale 1000) = 1000 - 1000 * |w - w*| / 64, reported right
 * after each decision through kml_proxy_evaluate().
 *
 * Decisions run in an hrtimer in softirq context (the decision path is
 * atomic-safe): a 1 ms tick makes rate/1000 decisions on average.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/hrtimer.h>
#include <linux/ktime.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/mutex.h>

#include <kmlbus/kmlbus.h>

#define SAMPLE_STREAMS		64
#define SAMPLE_DEFAULT_WINDOW	8
#define SAMPLE_MIN_WINDOW	1
#define SAMPLE_MAX_WINDOW	64
#define SAMPLE_SCALE		1000
#define SAMPLE_TICK_NS		(NSEC_PER_SEC / 1000)
#define SAMPLE_MAX_PER_TICK	1000	/* bound the catch-up after a stall */
#define SAMPLE_OBS_NOISE	50	/* +- permille on seq_ratio */

static unsigned int rate = 2000;
static unsigned long long seed = 1;
module_param(seed, ullong, 0444);
MODULE_PARM_DESC(seed, "PRNG seed of the workload (streams and noise)");

static DEFINE_MUTEX(sample_lock);	/* sample_running vs. the rate setter */
static struct kml_proxy *sample_proxy;
static struct hrtimer sample_timer;
static bool sample_running;
static u64 sample_rng;			/* only touched by the timer (and init) */
static u32 sample_seq_ratio[SAMPLE_STREAMS];	/* hidden s_k, permille */
static u64 sample_credit;		/* decisions owed, in 1e-3 units */

/* splitmix64: small, deterministic, good enough for a workload. */
static u64 sample_next(void)
{
	u64 z = (sample_rng += 0x9e3779b97f4a7c15ULL);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static u32 sample_below(u32 n)
{
	return (u32)(((sample_next() >> 32) * n) >> 32);
}

static s32 sample_optimal(u32 key)
{
	return 1 + DIV_ROUND_CLOSEST(63 * sample_seq_ratio[key], SAMPLE_SCALE);
}

static s32 sample_default(struct kml_proxy *proxy, u32 key, const s32 *features)
{
	return SAMPLE_DEFAULT_WINDOW;
}

static s32 sample_efficiency(struct kml_proxy *proxy, const struct kml_decision *dec)
{
	s32 diff = abs(dec->value - sample_optimal(dec->key));

	return SAMPLE_SCALE - SAMPLE_SCALE * diff / SAMPLE_MAX_WINDOW;
}

static const struct kml_proxy_ops sample_ops = {
	.default_decision	= sample_default,
	.estimate_efficiency	= sample_efficiency,
};

static const struct kml_proxy_desc sample_desc = {
	.name		= "sample",
	.owner		= THIS_MODULE,
	.nkeys		= SAMPLE_STREAMS,
	.nfeatures	= 3,
	.features	= {
		{ .name = "seq_ratio", .scale = SAMPLE_SCALE },
		{ .name = "req_size", .scale = SAMPLE_SCALE },
		{ .name = "noise", .scale = SAMPLE_SCALE },
	},
	.recommendation	= {
		.name	= "window",
		.scale	= 1,
		.min	= SAMPLE_MIN_WINDOW,
		.max	= SAMPLE_MAX_WINDOW,
	},
	.efficiency_scale = SAMPLE_SCALE,
	.ops		= &sample_ops,
};

static void sample_one(void)
{
	struct kml_decision dec;
	s32 f[3];
	u32 key = sample_below(SAMPLE_STREAMS);
	s32 obs = (s32)sample_seq_ratio[key] +
		  (s32)sample_below(2 * SAMPLE_OBS_NOISE + 1) - SAMPLE_OBS_NOISE;

	f[0] = clamp(obs, 0, SAMPLE_SCALE);
	f[1] = (s32)(1 + sample_below(SAMPLE_MAX_WINDOW)) * SAMPLE_SCALE;
	f[2] = (s32)sample_below(SAMPLE_SCALE + 1);
	if (kml_proxy_decide(sample_proxy, key, f, &dec))
		return;
	kml_proxy_evaluate(sample_proxy, &dec);
}

static enum hrtimer_restart sample_tick(struct hrtimer *t)
{
	unsigned int r = READ_ONCE(rate);
	u64 ticks, n;

	if (!r || !READ_ONCE(sample_running))
		return HRTIMER_NORESTART;
	ticks = hrtimer_forward_now(t, ns_to_ktime(SAMPLE_TICK_NS));
	sample_credit += ticks * r;
	n = min_t(u64, sample_credit / 1000, SAMPLE_MAX_PER_TICK);
	sample_credit = n == SAMPLE_MAX_PER_TICK ? 0 : sample_credit - n * 1000;
	while (n--)
		sample_one();
	return HRTIMER_RESTART;
}

static void sample_kick(void)
{
	mutex_lock(&sample_lock);
	if (sample_running && READ_ONCE(rate) && !hrtimer_active(&sample_timer))
		hrtimer_start(&sample_timer, ns_to_ktime(SAMPLE_TICK_NS),
			      HRTIMER_MODE_REL_SOFT);
	mutex_unlock(&sample_lock);
}

static int rate_set(const char *val, const struct kernel_param *kp)
{
	int err = param_set_uint(val, kp);

	if (!err)
		sample_kick();
	return err;
}

static const struct kernel_param_ops rate_ops = {
	.set	= rate_set,
	.get	= param_get_uint,
};
module_param_cb(rate, &rate_ops, &rate, 0644);
MODULE_PARM_DESC(rate, "decisions per second (default 2000, 0 pauses)");

static int __init sample_init(void)
{
	struct kml_proxy *p;
	int i;

	sample_rng = seed;
	for (i = 0; i < SAMPLE_STREAMS; i++)
		sample_seq_ratio[i] = sample_below(SAMPLE_SCALE + 1);

	p = kml_proxy_register(&sample_desc);
	if (IS_ERR(p))
		return PTR_ERR(p);
	sample_proxy = p;

	hrtimer_init(&sample_timer, CLOCK_MONOTONIC, HRTIMER_MODE_REL_SOFT);
	sample_timer.function = sample_tick;
	WRITE_ONCE(sample_running, true);
	sample_kick();
	pr_info("proxy %u started, rate %u/s, seed %llu\n", kml_proxy_id(p),
		rate, seed);
	return 0;
}

static void __exit sample_exit(void)
{
	mutex_lock(&sample_lock);
	WRITE_ONCE(sample_running, false);
	mutex_unlock(&sample_lock);
	hrtimer_cancel(&sample_timer);
	kml_proxy_stop(sample_proxy);
	kml_proxy_destroy(sample_proxy);
}

module_init(sample_init);
module_exit(sample_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmlbus sample workload: readahead-window proxy \"sample\"");
MODULE_SOFTDEP("pre: kmlbus");
