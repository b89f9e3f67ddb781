"""The algorithm core is plain torch and numpy: importing it loads no storage, Ray, YAML or transformers."""
from __future__ import annotations

import subprocess
import sys

HEAVY = ("pyarrow", "pandas", "ray", "yaml", "transformers")
CORE = ("model", "adapt", "rpo", "metrics", "baselines", "active", "splits", "meta", "personalize", "basis",
        "reference", "config")


def test_importing_the_core_loads_no_storage_ray_yaml_or_transformers():
    code = ("import sys\n"
            + "".join(f"import mrm_ray.core.{m}\n" for m in CORE)
            + f"print(','.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "", f"mrm_ray.core imported {p.stdout.strip()}"


def test_the_check_can_fail():
    """The same probe sees a heavy import when there is one (so the test above can fail)."""
    p = subprocess.run([sys.executable, "-c", "import sys, mrm_ray.data.storage; print('pyarrow' in sys.modules)"],
                       capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == "True", p.stderr
