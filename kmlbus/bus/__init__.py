"""The bus: the daemon's loop, one object per proxy, dispatcher, model registry, learner.

Built on :mod:`kmlbus.wire` and the mode machine in :mod:`modes`; the tools in
:mod:`kmlbus.tools` drive it.
"""
