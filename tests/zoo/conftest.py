import os
import sys

# tests/ on the path so `from zoo import models` works from any rootdir
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
