"""The generated controller reference is current."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_controller_reference_is_current():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_controller_docs.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
