// SPDX-License-Identifier: GPL-2.0
/*
 * kmlbus generic netlink handlers.  The policies and the ops table are
 * generated (kmlbus_nl_gen.c); this file implements the handlers and the
 * multicast notifications.  Handlers run serialised by genl_mutex and hold
 * kmlbus_reg_lock while they touch a proxy, so a proxy cannot be destroyed
 * under them.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/jiffies.h>
#include <net/genetlink.h>
#include <net/netlink.h>

#include "kmlbus_internal.h"
#include "kmlbus_nl_gen.h"

struct genl_family kmlbus_family __ro_after_init = {
	.name		= KMLBUS_FAMILY_NAME,
	.version	= KMLBUS_FAMILY_VERSION,
	.netnsok	= false,	/* proxies are global: init_net only */
	.parallel_ops	= false,
	.module		= THIS_MODULE,
	.ops		= kmlbus_nl_ops,
	.n_ops		= ARRAY_SIZE(kmlbus_nl_ops),
	/* resv_start_op 0: every op gets the reserved header byte checked */
	.mcgrps		= kmlbus_nl_mcgrps,
	.n_mcgrps	= ARRAY_SIZE(kmlbus_nl_mcgrps),
};

/* ---- message builders ----------------------------------------------- */

static int put_field(struct sk_buff *skb, int type, const char *name, u32 scale,
		     const s32 *min, const s32 *max)
{
	struct nlattr *nest = nla_nest_start(skb, type);

	if (!nest)
		return -EMSGSIZE;
	if (nla_put_string(skb, KMLBUS_A_FIELD_NAME, name) ||
	    nla_put_u32(skb, KMLBUS_A_FIELD_SCALE, scale) ||
	    (min && nla_put_s32(skb, KMLBUS_A_FIELD_MIN, *min)) ||
	    (max && nla_put_s32(skb, KMLBUS_A_FIELD_MAX, *max))) {
		nla_nest_cancel(skb, nest);
		return -EMSGSIZE;
	}
	nla_nest_end(skb, nest);
	return 0;
}

static int put_counters(struct sk_buff *skb, struct kml_proxy *p)
{
	struct nlattr *nest = nla_nest_start(skb, KMLBUS_A_PROXY_COUNTERS);
	int i;

	if (!nest)
		return -EMSGSIZE;
	for (i = 1; i <= KMLBUS_A_COUNTERS_MAX; i++) {
		if (i == KMLBUS_A_COUNTERS_PAD)
			continue;
		if (nla_put_u64_64bit(skb, i, kmlbus_counter(p, i),
				      KMLBUS_A_COUNTERS_PAD)) {
			nla_nest_cancel(skb, nest);
			return -EMSGSIZE;
		}
	}
	nla_nest_end(skb, nest);
	return 0;
}

static int fill_proxy(struct sk_buff *skb, struct kml_proxy *p, u32 portid,
		      u32 seq, int flags)
{
	const struct kml_rec_desc *rd = &p->desc.recommendation;
	u64 mode_ms;
	void *hdr;
	u32 i;

	hdr = genlmsg_put(skb, portid, seq, &kmlbus_family, flags,
			  KMLBUS_CMD_GET);
	if (!hdr)
		return -EMSGSIZE;
	mode_ms = jiffies_to_msecs(jiffies - READ_ONCE(p->mode_since));
	if (nla_put_u32(skb, KMLBUS_A_PROXY_ID, p->id) ||
	    nla_put_string(skb, KMLBUS_A_PROXY_NAME, p->name) ||
	    nla_put_u32(skb, KMLBUS_A_PROXY_MODE, READ_ONCE(p->mode)) ||
	    nla_put_u32(skb, KMLBUS_A_PROXY_LIFECYCLE, READ_ONCE(p->lifecycle)) ||
	    nla_put_u32(skb, KMLBUS_A_PROXY_NKEYS, p->desc.nkeys))
		goto cancel;
	for (i = 0; i < p->desc.nfeatures; i++)
		if (put_field(skb, KMLBUS_A_PROXY_FEATURE, p->desc.features[i].name,
			      p->desc.features[i].scale, NULL, NULL))
			goto cancel;
	if (put_field(skb, KMLBUS_A_PROXY_RECOMMENDATION, rd->name, rd->scale,
		      &rd->min, &rd->max) ||
	    put_counters(skb, p) ||
	    nla_put_u32(skb, KMLBUS_A_PROXY_BUS_PORTID, READ_ONCE(p->bus_portid)) ||
	    nla_put_u32(skb, KMLBUS_A_PROXY_SHARE, READ_ONCE(p->share)) ||
	    nla_put_u32(skb, KMLBUS_A_PROXY_EXPLORE, READ_ONCE(p->explore)) ||
	    nla_put_u32(skb, KMLBUS_A_PROXY_REASON, READ_ONCE(p->reason)) ||
	    nla_put_u64_64bit(skb, KMLBUS_A_PROXY_MODE_MS, mode_ms,
			      KMLBUS_A_PROXY_PAD) ||
	    nla_put_u32(skb, KMLBUS_A_PROXY_EFFICIENCY_SCALE,
			p->desc.efficiency_scale) ||
	    nla_put_u32(skb, KMLBUS_A_PROXY_STALE_MS, READ_ONCE(p->stale_ms)) ||
	    nla_put_u32(skb, KMLBUS_A_PROXY_MODE_SEQ, READ_ONCE(p->mode_seq)) ||
	    nla_put_u32(skb, KMLBUS_A_PROXY_SAMPLE_PERIOD,
			READ_ONCE(p->sample_period)))
		goto cancel;
	genlmsg_end(skb, hdr);
	return 0;

cancel:
	genlmsg_cancel(skb, hdr);
	return -EMSGSIZE;
}

/*
 * Start an event on the events group: the header, the proxy's id and name,
 * with room for @n_u32 more u32 attributes.  NULL when nobody listens or on
 * allocation failure (events are best effort; mode-seq lets a listener see a
 * gap).  Process context only: GFP_KERNEL.
 */
static struct sk_buff *event_start(struct kml_proxy *p, u8 cmd, int n_u32,
				   void **hdr)
{
	struct sk_buff *skb;

	if (!genl_has_listeners(&kmlbus_family, &init_net, KMLBUS_NLGRP_EVENTS))
		return NULL;
	skb = genlmsg_new((n_u32 + 1) * nla_total_size(sizeof(u32)) +
			  nla_total_size(strlen(p->name) + 1), GFP_KERNEL);
	if (!skb)
		return NULL;
	*hdr = genlmsg_put(skb, 0, 0, &kmlbus_family, 0, cmd);
	if (!*hdr)
		goto err_free;
	if (nla_put_u32(skb, KMLBUS_A_PROXY_ID, p->id) ||
	    nla_put_string(skb, KMLBUS_A_PROXY_NAME, p->name))
		goto err_cancel;
	return skb;

err_cancel:
	genlmsg_cancel(skb, *hdr);
err_free:
	nlmsg_free(skb);
	return NULL;
}

/* Finish an event begun by event_start(); @failed drops it instead. */
static void event_send(struct sk_buff *skb, void *hdr, bool failed)
{
	if (failed) {
		genlmsg_cancel(skb, hdr);
		nlmsg_free(skb);
		return;
	}
	genlmsg_end(skb, hdr);
	genlmsg_multicast(&kmlbus_family, skb, 0, KMLBUS_NLGRP_EVENTS, GFP_KERNEL);
}

/* Process context (the proxy's event_work). */
void kmlbus_nl_mode_event(struct kml_proxy *p, const struct kml_mode_event *ev)
{
	struct sk_buff *skb;
	void *hdr;

	skb = event_start(p, KMLBUS_CMD_MODE_EVENT, 4, &hdr);
	if (!skb)
		return;
	event_send(skb, hdr,
		   nla_put_u32(skb, KMLBUS_A_PROXY_MODE, ev->mode) ||
		   nla_put_u32(skb, KMLBUS_A_PROXY_OLD_MODE, ev->old) ||
		   nla_put_u32(skb, KMLBUS_A_PROXY_REASON, ev->reason) ||
		   nla_put_u32(skb, KMLBUS_A_PROXY_MODE_SEQ, ev->seq));
}

/* Process context (kml_proxy_destroy): the proxy is unlisted, not yet freed. */
void kmlbus_nl_removed_event(struct kml_proxy *p)
{
	struct sk_buff *skb;
	void *hdr;

	skb = event_start(p, KMLBUS_CMD_PROXY_REMOVED, 1, &hdr);
	if (!skb)
		return;
	event_send(skb, hdr,
		   nla_put_u32(skb, KMLBUS_A_PROXY_MODE_SEQ, READ_ONCE(p->mode_seq)));
}

/* ---- request helpers ------------------------------------------------ */

/*
 * The proxy named by KMLBUS_A_PROXY_ID, with kmlbus_reg_lock held and its
 * owner module pinned for the request; NULL with extack set otherwise.
 */
static struct kml_proxy *get_proxy(struct genl_info *info)
{
	struct nlattr *id = info->attrs[KMLBUS_A_PROXY_ID];
	struct kml_proxy *p;

	if (GENL_REQ_ATTR_CHECK(info, KMLBUS_A_PROXY_ID)) {
		NL_SET_ERR_MSG(info->extack, "missing proxy id (KMLBUS_A_PROXY_ID)");
		return ERR_PTR(-EINVAL);
	}
	mutex_lock(&kmlbus_reg_lock);
	p = kmlbus_find_by_id(nla_get_u32(id));
	if (!p || !try_module_get(p->desc.owner)) {
		mutex_unlock(&kmlbus_reg_lock);
		NL_SET_ERR_MSG_ATTR(info->extack, id, "no proxy with this id");
		return ERR_PTR(-ENOENT);
	}
	return p;
}

static void put_proxy(struct kml_proxy *p)
{
	module_put(p->desc.owner);
	mutex_unlock(&kmlbus_reg_lock);
}

/*
 * Requests that steer an attached proxy come only from its bus: another
 * CAP_NET_ADMIN socket, say a bus that missed a destroy and re-create, must
 * not reach it.  Exceptions (set-mode only): the operator's word (reason
 * operator, what `kmlbus mode` sends; the bus follows the event) and the
 * brake (mode emergency).  Anyone may also detach it.
 */
static int check_bus(struct kml_proxy *p, struct genl_info *info)
{
	u32 bus = READ_ONCE(p->bus_portid);

	if (!bus || (bus == info->snd_portid &&
		     READ_ONCE(p->bus_net) == genl_info_net(info)))
		return 0;
	NL_SET_ERR_MSG_ATTR(info->extack, info->attrs[KMLBUS_A_PROXY_ID],
			    "proxy is attached to another bus socket: only that bus may steer it (others: reason operator, mode emergency, or detach)");
	return -EBUSY;
}

/* ---- handlers ------------------------------------------------------- */

int kmlbus_nl_get_doit(struct sk_buff *skb, struct genl_info *info)
{
	struct nlattr *id = info->attrs[KMLBUS_A_PROXY_ID];
	struct nlattr *name = info->attrs[KMLBUS_A_PROXY_NAME];
	struct kml_proxy *p;
	struct sk_buff *msg;
	int err;

	if (!id && !name) {
		NL_SET_ERR_MSG(info->extack,
			       "get needs KMLBUS_A_PROXY_ID or KMLBUS_A_PROXY_NAME (or a dump)");
		return -EINVAL;
	}
	msg = genlmsg_new(NLMSG_GOODSIZE, GFP_KERNEL);
	if (!msg)
		return -ENOMEM;

	mutex_lock(&kmlbus_reg_lock);
	p = id ? kmlbus_find_by_id(nla_get_u32(id)) : kmlbus_find_by_name(nla_data(name));
	if (p && id && name && strncmp(p->name, nla_data(name), KMLBUS_NAME_LEN))
		p = NULL;
	if (!p) {
		mutex_unlock(&kmlbus_reg_lock);
		if (id)
			NL_SET_ERR_MSG_ATTR(info->extack, id,
					    "no proxy with this id (and name)");
		else
			NL_SET_ERR_MSG_ATTR(info->extack, name,
					    "no proxy with this name");
		nlmsg_free(msg);
		return -ENOENT;
	}
	err = fill_proxy(msg, p, info->snd_portid, info->snd_seq, 0);
	mutex_unlock(&kmlbus_reg_lock);
	if (err) {
		nlmsg_free(msg);
		return err;
	}
	return genlmsg_reply(msg, info);
}

int kmlbus_nl_get_dumpit(struct sk_buff *skb, struct netlink_callback *cb)
{
	long skip = cb->args[0], idx = 0;
	struct kml_proxy *p;

	mutex_lock(&kmlbus_reg_lock);
	list_for_each_entry(p, &kmlbus_proxies, node) {
		if (idx >= skip &&
		    fill_proxy(skb, p, NETLINK_CB(cb->skb).portid,
			       cb->nlh->nlmsg_seq, NLM_F_MULTI))
			break;
		idx++;
	}
	mutex_unlock(&kmlbus_reg_lock);
	cb->args[0] = idx;
	return skb->len;
}

int kmlbus_nl_set_mode_doit(struct sk_buff *skb, struct genl_info *info)
{
	struct nlattr *mode = info->attrs[KMLBUS_A_PROXY_MODE];
	struct nlattr *reason = info->attrs[KMLBUS_A_PROXY_REASON];
	struct kml_proxy *p;
	u32 why;
	int err;

	if (GENL_REQ_ATTR_CHECK(info, KMLBUS_A_PROXY_MODE)) {
		NL_SET_ERR_MSG(info->extack, "missing mode (KMLBUS_A_PROXY_MODE)");
		return -EINVAL;
	}
	p = get_proxy(info);
	if (IS_ERR(p))
		return PTR_ERR(p);
	why = reason ? nla_get_u32(reason) : KMLBUS_REASON_OPERATOR;
	if (why != KMLBUS_REASON_OPERATOR &&
	    nla_get_u32(mode) != KMLBUS_MODE_EMERGENCY) {
		err = check_bus(p, info);
		if (err)
			goto out;
	}
	err = kmlbus_change_mode(p, nla_get_u32(mode), why, false);
	if (err)
		NL_SET_ERR_MSG_ATTR(info->extack, mode,
				    "mode change not allowed by the mode graph (kmlbus/contract/graph.yaml)");
out:
	put_proxy(p);
	return err;
}

int kmlbus_nl_set_params_doit(struct sk_buff *skb, struct genl_info *info)
{
	struct nlattr *share = info->attrs[KMLBUS_A_PROXY_SHARE];
	struct nlattr *explore = info->attrs[KMLBUS_A_PROXY_EXPLORE];
	struct nlattr *stale = info->attrs[KMLBUS_A_PROXY_STALE_MS];
	struct nlattr *period = info->attrs[KMLBUS_A_PROXY_SAMPLE_PERIOD];
	struct kml_proxy *p;

	if (stale && nla_get_u32(stale) > KMLBUS_MAX_TTL_MS * 1000U) {
		NL_SET_ERR_MSG_ATTR(info->extack, stale,
				    "stale-ms too large (at most 1000 * max-ttl-ms)");
		return -ERANGE;
	}
	if (period && (nla_get_u32(period) < 1 ||
		       nla_get_u32(period) > KMLBUS_MAX_SAMPLE_PERIOD)) {
		NL_SET_ERR_MSG_ATTR(info->extack, period,
				    "sample-period out of range (1..max-sample-period)");
		return -EINVAL;
	}
	p = get_proxy(info);
	if (IS_ERR(p))
		return PTR_ERR(p);
	if (share)
		WRITE_ONCE(p->share, nla_get_u32(share));
	if (explore)
		WRITE_ONCE(p->explore, nla_get_u32(explore));
	if (stale)
		WRITE_ONCE(p->stale_ms, nla_get_u32(stale));
	if (period)
		WRITE_ONCE(p->sample_period, nla_get_u32(period));
	put_proxy(p);
	return 0;
}

int kmlbus_nl_attach_doit(struct sk_buff *skb, struct genl_info *info)
{
	struct kml_proxy *p;
	u32 cur;
	int err = 0;

	p = get_proxy(info);
	if (IS_ERR(p))
		return PTR_ERR(p);
	cur = READ_ONCE(p->bus_portid);
	if (cur && (cur != info->snd_portid || p->bus_net != genl_info_net(info))) {
		NL_SET_ERR_MSG_ATTR(info->extack, info->attrs[KMLBUS_A_PROXY_ID],
				    "proxy already attached to another live bus socket");
		err = -EBUSY;
		goto out;
	}
	WRITE_ONCE(p->bus_net, genl_info_net(info));
	/* the release notifier clears it with cmpxchg */
	if (cmpxchg(&p->bus_portid, cur, info->snd_portid) != cur) {
		NL_SET_ERR_MSG_ATTR(info->extack, info->attrs[KMLBUS_A_PROXY_ID],
				    "bus socket changed during attach, retry");
		err = -EAGAIN;
	}
out:
	put_proxy(p);
	return err;
}

int kmlbus_nl_detach_doit(struct sk_buff *skb, struct genl_info *info)
{
	struct kml_proxy *p;
	u32 cur;
	int err = 0;

	p = get_proxy(info);
	if (IS_ERR(p))
		return PTR_ERR(p);
	cur = READ_ONCE(p->bus_portid);
	if (!cur || cmpxchg(&p->bus_portid, cur, 0) != cur) {
		NL_SET_ERR_MSG_ATTR(info->extack, info->attrs[KMLBUS_A_PROXY_ID],
				    "proxy has no bus attached");
		err = -ENOTCONN;
		goto out;
	}
	kmlbus_change_mode(p, KMLBUS_MODE_EMERGENCY, KMLBUS_REASON_DETACH, true);
out:
	put_proxy(p);
	return err;
}

/*
 * All-or-nothing: the whole batch is checked before any slot is written.
 * Each rec is one KMLBUS_A_PROXY_RECS attribute (multi-attr), so a refusal
 * points the extack at the offending rec's own attribute: a generic client
 * (YNL) names it, and its index is its place among the recs attributes.
 * 6.1 has no formatted extack, hence the "[offset]" in the messages.
 */
int kmlbus_nl_recommend_doit(struct sk_buff *skb, struct genl_info *info)
{
	const struct kmlbus_rec *rec;
	struct kml_proxy *p;
	struct nlattr *a;
	int rem, err = 0;
	u32 n = 0;

	if (GENL_REQ_ATTR_CHECK(info, KMLBUS_A_PROXY_RECS)) {
		NL_SET_ERR_MSG(info->extack, "missing recs (KMLBUS_A_PROXY_RECS)");
		return -EINVAL;
	}
	nlmsg_for_each_attr(a, info->nlhdr, GENL_HDRLEN, rem) {
		if (nla_type(a) != KMLBUS_A_PROXY_RECS)
			continue;
		if (nla_len(a) != sizeof(*rec)) {
			NL_SET_ERR_MSG_ATTR(info->extack, a,
					    "recs: each attribute must hold one struct kmlbus_rec (12 bytes)");
			return -EINVAL;
		}
		if (++n > KMLBUS_MAX_RECS) {
			NL_SET_ERR_MSG_ATTR(info->extack, a,
					    "recs: more than KMLBUS_MAX_RECS entries in one request");
			return -E2BIG;
		}
		rec = nla_data(a);
		if (!rec->ttl_ms || rec->ttl_ms > KMLBUS_MAX_TTL_MS) {
			NL_SET_ERR_MSG_ATTR(info->extack, a,
					    "recs[offset]: ttl-ms must be 1..KMLBUS_MAX_TTL_MS");
			return -EINVAL;
		}
	}

	p = get_proxy(info);
	if (IS_ERR(p))
		return PTR_ERR(p);
	err = check_bus(p, info);
	if (err)
		goto out;
	nlmsg_for_each_attr(a, info->nlhdr, GENL_HDRLEN, rem) {
		if (nla_type(a) != KMLBUS_A_PROXY_RECS)
			continue;
		rec = nla_data(a);
		if (rec->key >= p->desc.nkeys) {
			NL_SET_ERR_MSG_ATTR(info->extack, a,
					    "recs[offset]: key >= the proxy's nkeys");
			err = -EINVAL;
			goto out;
		}
	}
	nlmsg_for_each_attr(a, info->nlhdr, GENL_HDRLEN, rem)
		if (nla_type(a) == KMLBUS_A_PROXY_RECS)
			kmlbus_store_recs(p, nla_data(a), 1);
out:
	put_proxy(p);
	return err;
}

/* ---- registration --------------------------------------------------- */

int kmlbus_nl_register(void)
{
	return genl_register_family(&kmlbus_family);
}

void kmlbus_nl_unregister(void)
{
	genl_unregister_family(&kmlbus_family);
}
