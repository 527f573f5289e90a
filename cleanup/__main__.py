"""``python -m cleanup`` — the same as the ``checkpoint-cleanup`` command."""

from cleanup.cli import main

raise SystemExit(main())
