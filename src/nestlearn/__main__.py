"""`python -m nestlearn` is the `nestlearn` command."""

from nestlearn.cli import main

raise SystemExit(main())
