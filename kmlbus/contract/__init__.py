"""The contracts kernel and bus share: the family spec and the mode graph.

``kmlbus.yaml`` (the generic netlink family) and ``graph.yaml`` (the modes and
the moves between them) ship as package data with their loaders
(:mod:`.spec`, :mod:`.graph`), which need only PyYAML.  :mod:`.cgen` generates
the kernel's C tables from both.  Nothing here imports the rest of kmlbus.
"""
