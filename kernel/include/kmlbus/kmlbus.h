/* SPDX-License-Identifier: GPL-2.0 */
/*
 * kmlbus in-kernel API: model proxies for kernel decision points.
 *
 * A subsystem describes its decision point with a struct kml_proxy_desc
 * (feature schema, recommendation schema, default algorithm) and drives the
 * proxy through the paper's lifecycle verbs:
 *
 *	p = kml_proxy_create(&desc);	create   (UNKNOWN -> CREATED)
 *	kml_proxy_init(p);		init     (-> INITIALIZED: buffers, table)
 *	kml_proxy_start(p);		start    (-> STARTED, RUNNING on first decision)
 *	kml_proxy_decide(p, ...);	apply_recommendation / execute_operation
 *	kml_proxy_report(p, ...);	error_backpropagation (efficiency feedback)
 *	kml_proxy_evaluate(p, ...);	estimate_efficiency + report
 *	kml_proxy_submit(p, ...);	publish_data (telemetry only)
 *	kml_proxy_set_mode(p, ...);	correct_system_state (mode gate)
 *	kml_proxy_stop(p);		stop     (-> STOPPED)
 *	kml_proxy_destroy(p);		destroy  (-> SHUTTING_DOWN, freed)
 *
 * kml_proxy_register(&desc) does create, init and start in one call (undone
 * on failure); kml_proxy_destroy() alone undoes it, since it stops first.
 *
 * kml_proxy_decide(), kml_proxy_report(), kml_proxy_evaluate(),
 * kml_proxy_submit() and kml_proxy_set_mode() never sleep and may be called
 * from any context but NMI, including hard and soft interrupts.  The lifecycle verbs
 * sleep.  The owner must stop calling decide/report/submit before
 * kml_proxy_destroy().
 */
#ifndef _KMLBUS_KMLBUS_H
#define _KMLBUS_KMLBUS_H

#include <linux/types.h>
#include <linux/module.h>
#include <uapi/linux/kmlbus.h>

struct kml_proxy;

/* One fixed-point feature: real value = raw / scale. */
struct kml_field_desc {
	const char *name;
	u32 scale;
};

/* The recommended value, with the safe bounds model values are clamped to. */
struct kml_rec_desc {
	const char *name;
	u32 scale;
	s32 min;
	s32 max;
};

/* What one decision was: returned by decide, passed back to report. */
struct kml_decision {
	u64 seq;	/* telemetry sequence number, 0 if not recorded */
	u32 key;	/* recommendation slot */
	s32 value;	/* the value the caller must use */
	u8 arm;		/* KMLBUS_ARM_DEFAULT or KMLBUS_ARM_MODEL */
	u8 mode;	/* mode the decision was made in */
	u16 flags;	/* KMLBUS_SAMPLE_FLAGS_* */
};

struct kml_proxy_ops {
	/* The human-made algorithm; must not sleep. */
	s32 (*default_decision)(struct kml_proxy *proxy, u32 key, const s32 *features);
	/* Optional: apply a (clamped) model value; returns the value used. */
	s32 (*apply)(struct kml_proxy *proxy, u32 key, s32 value);
	/* Optional: efficiency of a past decision, in efficiency_scale units. */
	s32 (*estimate_efficiency)(struct kml_proxy *proxy, const struct kml_decision *dec);
};

struct kml_proxy_desc {
	const char *name;		/* unique, < KMLBUS_NAME_LEN */
	struct module *owner;		/* THIS_MODULE */
	u32 nkeys;			/* 1..KMLBUS_MAX_KEYS */
	u32 nfeatures;			/* 0..KMLBUS_MAX_FEATURES */
	struct kml_field_desc features[KMLBUS_MAX_FEATURES];
	struct kml_rec_desc recommendation;
	u32 efficiency_scale;
	const struct kml_proxy_ops *ops;
	void *priv;			/* returned by kml_proxy_priv() */
};

struct kml_proxy *kml_proxy_create(const struct kml_proxy_desc *desc);
int kml_proxy_init(struct kml_proxy *proxy);
int kml_proxy_start(struct kml_proxy *proxy);
int kml_proxy_stop(struct kml_proxy *proxy);
void kml_proxy_destroy(struct kml_proxy *proxy);
struct kml_proxy *kml_proxy_register(const struct kml_proxy_desc *desc);

int kml_proxy_decide(struct kml_proxy *proxy, u32 key, const s32 *features,
		     struct kml_decision *out);
int kml_proxy_report(struct kml_proxy *proxy, const struct kml_decision *dec,
		     s32 efficiency);
int kml_proxy_evaluate(struct kml_proxy *proxy, const struct kml_decision *dec);
int kml_proxy_submit(struct kml_proxy *proxy, u32 key, const s32 *features);
int kml_proxy_set_mode(struct kml_proxy *proxy, u32 mode, u32 reason);

u32 kml_proxy_id(const struct kml_proxy *proxy);
u32 kml_proxy_mode(const struct kml_proxy *proxy);
void *kml_proxy_priv(const struct kml_proxy *proxy);

#endif /* _KMLBUS_KMLBUS_H */
