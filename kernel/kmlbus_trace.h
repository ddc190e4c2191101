/* SPDX-License-Identifier: GPL-2.0 */
#undef TRACE_SYSTEM
#define TRACE_SYSTEM kmlbus

#if !defined(_KMLBUS_TRACE_H) || defined(TRACE_HEADER_MULTI_READ)
#define _KMLBUS_TRACE_H

#include <linux/tracepoint.h>
#include <linux/version.h>

/*
 * Since 6.10, __assign_str() takes only the field: the source is the one
 * given to __string() (Debian 12 carries 6.1 and 6.12).
 */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 10, 0)
#define kmlbus_assign_str(field, src)	__assign_str(field)
#else
#define kmlbus_assign_str(field, src)	__assign_str(field, src)
#endif

TRACE_EVENT(kmlbus_mode_change,
	TP_PROTO(u32 id, const char *name, u32 seq, u32 old_mode, u32 mode,
		 u32 reason),
	TP_ARGS(id, name, seq, old_mode, mode, reason),
	TP_STRUCT__entry(
		__field(u32, id)
		__string(name, name)
		__field(u32, seq)
		__field(u32, old_mode)
		__field(u32, mode)
		__field(u32, reason)
	),
	TP_fast_assign(
		__entry->id = id;
		kmlbus_assign_str(name, name);
		__entry->seq = seq;
		__entry->old_mode = old_mode;
		__entry->mode = mode;
		__entry->reason = reason;
	),
	TP_printk("proxy=%u name=%s seq=%u old_mode=%u mode=%u reason=%u",
		  __entry->id, __get_str(name), __entry->seq, __entry->old_mode,
		  __entry->mode, __entry->reason)
);

TRACE_EVENT(kmlbus_rec_applied,
	TP_PROTO(u32 id, u64 seq, u32 key, s32 rec, s32 value),
	TP_ARGS(id, seq, key, rec, value),
	TP_STRUCT__entry(
		__field(u32, id)
		__field(u64, seq)
		__field(u32, key)
		__field(s32, rec)
		__field(s32, value)
	),
	TP_fast_assign(
		__entry->id = id;
		__entry->seq = seq;
		__entry->key = key;
		__entry->rec = rec;
		__entry->value = value;
	),
	TP_printk("proxy=%u seq=%llu key=%u rec=%d value=%d",
		  __entry->id, __entry->seq, __entry->key, __entry->rec,
		  __entry->value)
);

#endif /* _KMLBUS_TRACE_H */

#undef TRACE_INCLUDE_PATH
#define TRACE_INCLUDE_PATH .
#undef TRACE_INCLUDE_FILE
#define TRACE_INCLUDE_FILE kmlbus_trace
#include <trace/define_trace.h>
