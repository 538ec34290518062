import os
import sys

# Tests import the helpers in tests/ by module name.
sys.path.insert(0, os.path.dirname(__file__))
