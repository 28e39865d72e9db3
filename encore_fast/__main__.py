"""``python -m encore_fast ...`` (and ``torchrun -m encore_fast edit ...``): the CLI."""

from encore_fast.cli import main

raise SystemExit(main())
