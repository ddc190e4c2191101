"""Test doubles: a user-space stand-in of kmlbus.ko and a Python reference of its gate."""
