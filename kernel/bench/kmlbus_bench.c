// SPDX-License-Identifier: GPL-2.0
/*
 * kmlbus_bench: nanoseconds per kml_proxy_decide() against an empty
 * callback, measured in the same run.
 *
 * Registers the proxy "bench" (64 keys, 3 features, a constant default) and
 * puts it in recommendation mode.  Writing 1 to the `run` parameter runs, in
 * the writer's process context, `iters` calls of each of:
 *
 *   baseline  an empty callback with decide's arguments, called through the
 *             same function pointer as decide;
 *   default   kml_proxy_decide() on keys 32..63 (no recommendation: the
 *             default decides);
 *   fresh     kml_proxy_decide() on keys 0..31, which the bus filled with
 *             fresh recommendations beforehand (the model arm decides).
 *
 * The three are interleaved in chunks of BENCH_CHUNK calls with preemption
 * disabled; a chunk's cost is ktime_get_ns() around it, and the result is
 * the median chunk per call.  Every decide records a telemetry sample as in
 * real use: flushed by the proxy's work, counted unheard without a listener,
 * counted as drops when the ring overflows.  The `result` parameter reads
 *
 *   baseline_ns=.. decide_default_ns=.. decide_fresh_ns=.. iters=..
 *   chunks=.. default_model=.. fresh_model=..
 *
 * (one line; *_model count the decisions of that phase made by the model arm,
 * so fresh_model == iters proves the fresh path was measured).
 *
 * Writing N to `run_parallel` measures decisions per second without a
 * recommendation, first one kthread on one CPU, then one per online CPU at
 * once, N decisions each; `par_result` reads
 *
 *   cpus=.. iters=.. one_cpu_dps=.. all_cpus_dps=..
 *
 * `insmod kmlbus_bench.ko run=1` runs once at the end of init: parameters are
 * parsed before init, when there is no proxy yet.  A parameter store holds
 * no module reference, so exit can run during a run: it asks the run to stop
 * (bench_stop, checked between chunks) and takes bench_lock before it frees
 * the proxy.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/completion.h>
#include <linux/cpumask.h>
#include <linux/kthread.h>
#include <linux/ktime.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/mutex.h>
#include <linux/preempt.h>
#include <linux/sched.h>
#include <linux/slab.h>
#include <linux/sort.h>

#include <kmlbus/kmlbus.h>

#define BENCH_KEYS		64
#define BENCH_FRESH_KEYS	32	/* keys 0..31: fresh recs; 32..63: none */
#define BENCH_CHUNK		500
#define BENCH_DEFAULT		8
#define BENCH_RESULT_LEN	256
#define BENCH_MIN_ITERS		BENCH_CHUNK
#define BENCH_MAX_ITERS		50000000

enum bench_phase { BENCH_BASELINE, BENCH_DEFAULT_PATH, BENCH_FRESH, BENCH_PHASES };

typedef int (*bench_fn_t)(struct kml_proxy *proxy, u32 key, const s32 *features,
			  struct kml_decision *out);

static DEFINE_MUTEX(bench_lock);	/* runs, bench_proxy, bench_result */
static struct kml_proxy *bench_proxy;	/* NULL before init and from exit on */
static bool bench_run_at_init;		/* run=1 given to insmod */
static bool bench_stop;			/* exit wants the running run to end */
static char bench_result[BENCH_RESULT_LEN] = "none\n";
static char bench_par_result[BENCH_RESULT_LEN] = "none\n";
static bench_fn_t bench_fns[BENCH_PHASES];

static s32 bench_default(struct kml_proxy *proxy, u32 key, const s32 *features)
{
	return BENCH_DEFAULT;
}

/* The baseline: what a call costs with nothing behind it. */
static noinline int bench_empty(struct kml_proxy *proxy, u32 key,
				const s32 *features, struct kml_decision *out)
{
	return 0;
}

static const struct kml_proxy_ops bench_ops = {
	.default_decision = bench_default,
};

static const struct kml_proxy_desc bench_desc = {
	.name		= "bench",
	.owner		= THIS_MODULE,
	.nkeys		= BENCH_KEYS,
	.nfeatures	= 3,
	.features	= {
		{ .name = "f0", .scale = 1000 },
		{ .name = "f1", .scale = 1000 },
		{ .name = "f2", .scale = 1000 },
	},
	.recommendation	= {
		.name	= "value",
		.scale	= 1,
		.min	= 1,
		.max	= 64,
	},
	.efficiency_scale = 1000,
	.ops		= &bench_ops,
};

static unsigned int iters = 200000;

static int iters_set(const char *val, const struct kernel_param *kp)
{
	return param_set_uint_minmax(val, kp, BENCH_MIN_ITERS, BENCH_MAX_ITERS);
}

static const struct kernel_param_ops iters_ops = {
	.set	= iters_set,
	.get	= param_get_uint,
};
module_param_cb(iters, &iters_ops, &iters, 0644);
MODULE_PARM_DESC(iters, "calls per measured path and run (default 200000)");

/* Walk the mode graph to recommendation (emergency -> learning -> ...). */
static int bench_to_recommendation(struct kml_proxy *p)
{
	static const u32 path[] = {
		KMLBUS_MODE_LEARNING, KMLBUS_MODE_COLLABORATION,
		KMLBUS_MODE_RECOMMENDATION,
	};
	int i, err;

	if (kml_proxy_mode(p) == KMLBUS_MODE_RECOMMENDATION)
		return 0;
	if (kml_proxy_mode(p) != KMLBUS_MODE_EMERGENCY) {
		err = kml_proxy_set_mode(p, KMLBUS_MODE_EMERGENCY,
					 KMLBUS_REASON_OPERATOR);
		if (err)
			return err;
	}
	for (i = 0; i < ARRAY_SIZE(path); i++) {
		err = kml_proxy_set_mode(p, path[i], KMLBUS_REASON_OPERATOR);
		if (err)
			return err;
	}
	return 0;
}

static int bench_cmp_u64(const void *a, const void *b)
{
	u64 x = *(const u64 *)a, y = *(const u64 *)b;

	return x < y ? -1 : x > y;
}

/* Median of @n chunk costs, in 1/100 ns per call. */
static u64 bench_median(u64 *v, u32 n)
{
	sort(v, n, sizeof(*v), bench_cmp_u64, NULL);
	if (n % 2)
		return v[n / 2];
	return (v[n / 2 - 1] + v[n / 2]) / 2;
}

/*
 * One chunk of @phase: BENCH_CHUNK calls with preemption off.  Returns the
 * cost in 1/100 ns per call and adds model-arm decisions to *@model.
 */
static u64 bench_chunk(int phase, const s32 *features, u64 *model)
{
	bench_fn_t fn = READ_ONCE(bench_fns[phase]);
	u32 base = phase == BENCH_FRESH ? 0 : BENCH_FRESH_KEYS;
	struct kml_decision dec = { };
	u32 i, nmodel = 0;
	u64 t0, t1;

	preempt_disable();
	t0 = ktime_get_ns();
	for (i = 0; i < BENCH_CHUNK; i++) {
		fn(bench_proxy, base + (i % BENCH_FRESH_KEYS), features, &dec);
		nmodel += dec.arm == KMLBUS_ARM_MODEL;
	}
	t1 = ktime_get_ns();
	preempt_enable();
	*model += nmodel;
	return div_u64((t1 - t0) * 100, BENCH_CHUNK);
}

static int bench_run(void)
{
	static const s32 features[3] = { 500, 8000, 250 };
	u64 *cost[BENCH_PHASES] = { };
	u64 model[BENCH_PHASES] = { };
	u64 med[BENCH_PHASES];
	u32 nchunks, c;
	int ph, err;

	nchunks = DIV_ROUND_UP(READ_ONCE(iters), BENCH_CHUNK);
	err = -ENOMEM;
	for (ph = 0; ph < BENCH_PHASES; ph++) {
		cost[ph] = kvmalloc_array(nchunks, sizeof(u64), GFP_KERNEL);
		if (!cost[ph])
			goto out_free;
	}
	err = bench_to_recommendation(bench_proxy);
	if (err)
		goto out_free;

	/* dec.arm is written by decide; the empty callback leaves it alone */
	for (c = 0; c < nchunks; c++) {
		if (READ_ONCE(bench_stop)) {
			err = -ECANCELED;	/* exit is waiting for bench_lock */
			goto out_free;
		}
		for (ph = 0; ph < BENCH_PHASES; ph++)
			cost[ph][c] = bench_chunk(ph, features, &model[ph]);
		cond_resched();	/* lets the flush work drain the ring */
	}
	for (ph = 0; ph < BENCH_PHASES; ph++)
		med[ph] = bench_median(cost[ph], nchunks);

	scnprintf(bench_result, sizeof(bench_result),
		  "baseline_ns=%llu.%02llu decide_default_ns=%llu.%02llu decide_fresh_ns=%llu.%02llu iters=%u chunks=%u default_model=%llu fresh_model=%llu\n",
		  med[BENCH_BASELINE] / 100, med[BENCH_BASELINE] % 100,
		  med[BENCH_DEFAULT_PATH] / 100, med[BENCH_DEFAULT_PATH] % 100,
		  med[BENCH_FRESH] / 100, med[BENCH_FRESH] % 100,
		  nchunks * BENCH_CHUNK, nchunks, model[BENCH_DEFAULT_PATH],
		  model[BENCH_FRESH]);
	err = 0;
out_free:
	for (ph = 0; ph < BENCH_PHASES; ph++)
		kvfree(cost[ph]);
	return err;
}

static int run_set(const char *val, const struct kernel_param *kp)
{
	bool go;
	int err;

	err = kstrtobool(val, &go);
	if (err)
		return err;
	if (!go)
		return 0;
	mutex_lock(&bench_lock);
	if (!bench_proxy) {
		/* insmod's own parameters: no proxy yet, init runs it */
		if (!bench_stop)
			bench_run_at_init = true;
		err = bench_stop ? -ENODEV : 0;
	} else {
		err = bench_run();
	}
	mutex_unlock(&bench_lock);
	return err;
}

static int run_get(char *buffer, const struct kernel_param *kp);

/*
 * Decisions per second on one CPU, then on every online CPU at once: one
 * kthread per CPU, bound to it, released together, each making @n default
 * decisions (keys 32..63).  Rate = decisions / the slowest thread's time.
 */
struct bench_par {
	struct completion done;
	u64 ns;
	u32 n;
};

static atomic_t bench_par_go;

static int bench_par_fn(void *arg)
{
	static const s32 features[3] = { 500, 8000, 250 };
	struct bench_par *bp = arg;
	struct kml_decision dec;
	u64 t0;
	u32 i;

	while (!atomic_read(&bench_par_go))
		cond_resched();	/* the creator may need this CPU */
	t0 = ktime_get_ns();
	for (i = 0; i < bp->n; i++) {
		kml_proxy_decide(bench_proxy, BENCH_FRESH_KEYS + (i % BENCH_FRESH_KEYS),
				 features, &dec);
		if (!(i % BENCH_CHUNK))
			cond_resched();
	}
	bp->ns = ktime_get_ns() - t0;
	kthread_complete_and_exit(&bp->done, 0);
}

/* Decisions per second with @ncpus threads (CPUs 0.. in cpu_online_mask). */
static int bench_par_once(u32 ncpus, u32 n, u64 *dps)
{
	struct task_struct *t;
	struct bench_par *bp;
	u32 started = 0, i;
	u64 slowest = 0;
	int cpu, err = 0;

	bp = kcalloc(ncpus, sizeof(*bp), GFP_KERNEL);
	if (!bp)
		return -ENOMEM;
	atomic_set(&bench_par_go, 0);
	for_each_online_cpu(cpu) {
		if (started == ncpus)
			break;
		init_completion(&bp[started].done);
		bp[started].n = n;
		t = kthread_create_on_cpu(bench_par_fn, &bp[started], cpu,
					  "kmlbus_bench/%u");
		if (IS_ERR(t)) {
			err = PTR_ERR(t);
			break;
		}
		wake_up_process(t);
		started++;
	}
	atomic_set(&bench_par_go, 1);	/* also releases the started ones on error */
	for (i = 0; i < started; i++) {
		wait_for_completion(&bp[i].done);
		slowest = max(slowest, bp[i].ns);
	}
	if (!err && started == ncpus)
		*dps = div64_u64((u64)n * ncpus * NSEC_PER_SEC, max(slowest, 1ULL));
	else if (!err)
		err = -ENODEV;
	kfree(bp);
	return err;
}

static int run_parallel_set(const char *val, const struct kernel_param *kp)
{
	u32 n, ncpus = num_online_cpus();
	u64 one = 0, all = 0;
	int err;

	err = kstrtou32(val, 0, &n);
	if (err)
		return err;
	if (n < BENCH_MIN_ITERS || n > BENCH_MAX_ITERS)
		return -EINVAL;
	mutex_lock(&bench_lock);
	if (!bench_proxy || bench_stop) {
		err = -ENODEV;	/* before init, or exit is waiting */
		goto out;
	}
	err = bench_par_once(1, n, &one);
	if (!err)
		err = bench_par_once(ncpus, n, &all);
	if (!err)
		scnprintf(bench_par_result, sizeof(bench_par_result),
			  "cpus=%u iters=%u one_cpu_dps=%llu all_cpus_dps=%llu\n",
			  ncpus, n, one, all);
out:
	mutex_unlock(&bench_lock);
	return err;
}

static const struct kernel_param_ops run_parallel_ops = {
	.set	= run_parallel_set,
	.get	= run_get,
};
module_param_cb(run_parallel, &run_parallel_ops, NULL, 0644);
MODULE_PARM_DESC(run_parallel, "write N: N default decisions on one CPU, then N on each online CPU at once");

static int par_result_get(char *buffer, const struct kernel_param *kp)
{
	int n;

	mutex_lock(&bench_lock);
	n = sysfs_emit(buffer, "%s", bench_par_result);
	mutex_unlock(&bench_lock);
	return n;
}

static const struct kernel_param_ops par_result_ops = {
	.get	= par_result_get,
};
module_param_cb(par_result, &par_result_ops, NULL, 0444);
MODULE_PARM_DESC(par_result, "the last run_parallel: decisions/s on one CPU and on all (\"none\" before)");

static int run_get(char *buffer, const struct kernel_param *kp)
{
	return sysfs_emit(buffer, "0\n");
}

static const struct kernel_param_ops run_ops = {
	.set	= run_set,
	.get	= run_get,
};
module_param_cb(run, &run_ops, NULL, 0644);
MODULE_PARM_DESC(run, "write 1: run the benchmark now (returns when done)");

static int result_get(char *buffer, const struct kernel_param *kp)
{
	int n;

	mutex_lock(&bench_lock);
	n = sysfs_emit(buffer, "%s", bench_result);
	mutex_unlock(&bench_lock);
	return n;
}

static const struct kernel_param_ops result_ops = {
	.get	= result_get,
};
module_param_cb(result, &result_ops, NULL, 0444);
MODULE_PARM_DESC(result, "the last run's medians, ns per call (\"none\" before)");

static int __init bench_init(void)
{
	struct kml_proxy *p;
	int err;

	bench_fns[BENCH_BASELINE] = bench_empty;
	bench_fns[BENCH_DEFAULT_PATH] = kml_proxy_decide;
	bench_fns[BENCH_FRESH] = kml_proxy_decide;

	p = kml_proxy_register(&bench_desc);
	if (IS_ERR(p))
		return PTR_ERR(p);
	err = bench_to_recommendation(p);
	if (err)
		goto err_destroy;

	mutex_lock(&bench_lock);
	bench_proxy = p;
	if (bench_run_at_init)
		err = bench_run();
	if (err)
		bench_proxy = NULL;
	mutex_unlock(&bench_lock);
	if (err)
		goto err_destroy;
	return 0;

err_destroy:
	kml_proxy_destroy(p);
	return err;
}

static void __exit bench_exit(void)
{
	struct kml_proxy *p;

	WRITE_ONCE(bench_stop, true);	/* a run in a parameter store ends early */
	mutex_lock(&bench_lock);
	p = bench_proxy;
	bench_proxy = NULL;
	mutex_unlock(&bench_lock);
	kml_proxy_stop(p);
	kml_proxy_destroy(p);
}

module_init(bench_init);
module_exit(bench_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmlbus benchmark: ns per kml_proxy_decide vs an empty callback");
MODULE_SOFTDEP("pre: kmlbus");
