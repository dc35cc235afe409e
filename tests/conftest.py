import os
import sys
from pathlib import Path

# The rank functions live in tests/ and are imported by spawned processes by module name.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_NUM_THREADS", "2")
