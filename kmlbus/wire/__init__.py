"""The wire layer: message codec, raw netlink transport and pyroute2 control plane.

It knows the family spec and nothing of the daemon: it encodes, sends,
receives and decodes, and reports errors as the kernel gave them.
"""
