"""VM test suite: runs inside the QEMU guest via ``python -m kmlbus.vm test``."""
