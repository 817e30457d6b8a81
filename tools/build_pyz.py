#!/usr/bin/env python3
"""Build sysmail.pyz: sysmail.py, its translations and pure-Python dependencies in one zipapp.

    python3 tools/build_pyz.py [--output sysmail.pyz]

The result runs with any system Python 3.11+ and nothing else installed:
    python3 sysmail.pyz serve
Compiled extras (PyNaCl for ed25519, cryptography) cannot load from a zip; install them into
the system Python when you need them.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipapp
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PURE_DEPENDENCIES = ["dkimpy>=1.1.5", "redis>=5.0", "idna>=3.4"]
MAIN = "import sys\n\nimport sysmail\n\nsys.exit(sysmail.main())\n"


def build(output: Path) -> Path:
    """Install the dependencies into a staging folder with sysmail.py, then zip it."""
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "app"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile",
                        "--disable-pip-version-check", "--root-user-action=ignore",
                        "--target", str(stage), *PURE_DEPENDENCIES], check=True)
        for junk in stage.glob("*.dist-info"):
            shutil.rmtree(junk)
        shutil.rmtree(stage / "bin", ignore_errors=True)
        shutil.copy2(REPO / "sysmail.py", stage / "sysmail.py")
        shutil.copytree(REPO / "templates", stage / "templates")  # the shipped translations
        (stage / "__main__.py").write_text(MAIN)
        compiled = [p for p in stage.rglob("*") if p.suffix in (".so", ".pyd")]
        if compiled:
            raise SystemExit(f"build_pyz: compiled modules cannot run from a zip: {compiled}")
        zipapp.create_archive(stage, output, interpreter="/usr/bin/env python3", compressed=True)
    return output


def main() -> int:
    """Parse the command line and build."""
    parser = argparse.ArgumentParser(description="Build the single-file sysmail.pyz.")
    parser.add_argument("--output", type=Path, default=REPO / "sysmail.pyz")
    args = parser.parse_args()
    path = build(args.output)
    print(f"built {path} ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
