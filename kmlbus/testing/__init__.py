"""A property-based test kit for kmlbus proxies (hypothesis).

* :mod:`kmlbus.testing.schema`: a proxy's declared schema (features,
  recommendation with its bounds, efficiency scale) read from the kernel's
  ``get`` reply, never restated by hand.
* :mod:`kmlbus.testing.strategies`: hypothesis strategies generated from that
  schema (feature vectors, recommendations in and out of bounds, telemetry
  samples, feedback records).
* :mod:`kmlbus.testing.fuzz`: strategies of malformed requests for every
  operation of the family spec, and the check of one answered request.
* :mod:`kmlbus.testing.machine`: a ``RuleBasedStateMachine`` that drives any
  registered proxy through the mode graph against a live module and checks
  the kernel's invariants on every decision it reports.
* :mod:`kmlbus.testing.profiles`: hypothesis settings profiles (short in CI,
  long with ``KMLBUS_HYPOTHESIS_PROFILE=soak``).

The kit needs the ``test`` extra (hypothesis); the product never imports it.
"""
