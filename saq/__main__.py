"""``python -m saq train|eval|presets`` (same as the ``saq`` console script)."""
from saq.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
