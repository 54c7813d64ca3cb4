"""Run every benchmark and print their numbers (tests never assert timings)."""

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for name in ("evaluate.py", "soak.py"):
    print(f"== bench/{name}")
    sys.argv = [name]
    runpy.run_path(str(HERE / name), run_name="__main__")
