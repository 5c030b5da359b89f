"""Which modules a fresh interpreter has loaded after running some statements — for tests that guard what a
process (the sweeper, a worker's pool process) does not load."""

import json
import subprocess
import sys


def loaded_after(statements: str, modules: tuple[str, ...], timeout_s: float = 300) -> list[str]:
    """Those of ``modules`` in ``sys.modules`` once a new Python process has run ``statements``."""
    code = (
        f"import json, sys\n{statements}\n"
        f"print(json.dumps(sorted(name for name in {list(modules)!r} if name in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=timeout_s)
    return json.loads(result.stdout.strip().splitlines()[-1])
