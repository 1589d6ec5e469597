"""The GPU check moved to benchmarks/gpu_check.py; this path, which device sessions' commands name, runs it."""

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"), run_name="__main__")
