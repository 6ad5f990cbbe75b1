import os
import sys

# tests import their helpers as a plain module, also from spawned worker processes
sys.path.insert(0, os.path.dirname(__file__))
