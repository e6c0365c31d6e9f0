"""Post-copy's result line: bench/migrate.py's whole matrix (stop-and-copy, precopy, lazy, hybrid;
64/256/1024 MiB; idle and 50 MB/s), ending with the best mode's downtime at 1024 MiB idle.
Run as root from the repo: .venv/bin/python bench/postcopy.py [bench/migrate.py options]
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.migrate import main

if __name__ == "__main__":
    sys.argv[1:1] = ["--result", "postcopy"]
    asyncio.run(main())
