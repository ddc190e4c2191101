// SPDX-License-Identifier: GPL-2.0
/*
 * kmlbus_testmod: drives the in-kernel API from where the VM tests cannot
 * reach it from user space.  Test-only; never load it on a real machine.
 *
 * Registers the proxy "testmod" (4 keys, no features, default 1).
 *
 *   irq_mode  write a mode number: kml_proxy_set_mode(testmod, mode,
 *             operator) runs in hard interrupt context (irq_work); the write
 *             returns its result.  Reads the last result.
 *   leak      given to insmod: exit leaves the proxy behind (no stop, no
 *             destroy), as a buggy subsystem would.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/irq_work.h>
#include <linux/hardirq.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/mutex.h>

#include <kmlbus/kmlbus.h>

static DEFINE_MUTEX(testmod_lock);	/* one irq_mode write at a time */
static struct kml_proxy *testmod_proxy;
static bool leak;
module_param(leak, bool, 0444);
MODULE_PARM_DESC(leak, "exit without destroying the proxy (tests kmlbus's safety net)");

static struct irq_work testmod_work;
static u32 testmod_mode;
static int testmod_result;

static s32 testmod_default(struct kml_proxy *proxy, u32 key, const s32 *features)
{
	return 1;
}

static const struct kml_proxy_ops testmod_ops = {
	.default_decision = testmod_default,
};

static const struct kml_proxy_desc testmod_desc = {
	.name		= "testmod",
	.owner		= THIS_MODULE,
	.nkeys		= 4,
	.recommendation	= {
		.name	= "value",
		.scale	= 1,
		.min	= 0,
		.max	= 100,
	},
	.efficiency_scale = 1000,
	.ops		= &testmod_ops,
};

static void testmod_irq(struct irq_work *w)
{
	/* -EXDEV tells the test this did not run in a hard interrupt */
	testmod_result = in_hardirq() ?
		kml_proxy_set_mode(testmod_proxy, testmod_mode, KMLBUS_REASON_OPERATOR) :
		-EXDEV;
}

static int irq_mode_set(const char *val, const struct kernel_param *kp)
{
	u32 mode;
	int err;

	err = kstrtou32(val, 0, &mode);
	if (err)
		return err;
	mutex_lock(&testmod_lock);
	if (!testmod_proxy) {
		err = -ENODEV;	/* insmod's own parameters: no proxy yet */
		goto out;
	}
	testmod_mode = mode;
	irq_work_queue(&testmod_work);
	irq_work_sync(&testmod_work);
	err = testmod_result;
out:
	mutex_unlock(&testmod_lock);
	return err;
}

static int irq_mode_get(char *buffer, const struct kernel_param *kp)
{
	return sysfs_emit(buffer, "%d\n", READ_ONCE(testmod_result));
}

static const struct kernel_param_ops irq_mode_ops = {
	.set	= irq_mode_set,
	.get	= irq_mode_get,
};
module_param_cb(irq_mode, &irq_mode_ops, NULL, 0644);
MODULE_PARM_DESC(irq_mode, "write a mode: kml_proxy_set_mode from a hard interrupt");

static int __init testmod_init(void)
{
	struct kml_proxy *p;

	init_irq_work(&testmod_work, testmod_irq);
	p = kml_proxy_register(&testmod_desc);
	if (IS_ERR(p))
		return PTR_ERR(p);
	mutex_lock(&testmod_lock);
	testmod_proxy = p;
	mutex_unlock(&testmod_lock);
	return 0;
}

static void __exit testmod_exit(void)
{
	struct kml_proxy *p;

	mutex_lock(&testmod_lock);
	p = testmod_proxy;
	testmod_proxy = NULL;
	mutex_unlock(&testmod_lock);
	if (leak) {
		pr_info("leaving proxy %u behind (leak=1)\n", kml_proxy_id(p));
		return;
	}
	kml_proxy_stop(p);
	kml_proxy_destroy(p);
}

module_init(testmod_init);
module_exit(testmod_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmlbus test module: the in-kernel API from hard interrupts, a leaked proxy");
MODULE_SOFTDEP("pre: kmlbus");
