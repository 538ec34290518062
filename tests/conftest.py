import os
import sys

# Path choices are timed afresh in every test session, not replayed from this machine's cache.
os.environ.setdefault("SPAFL_PATH_CACHE", "off")

# Tests import the helpers in tests/ by module name.
sys.path.insert(0, os.path.dirname(__file__))
