"""`python -m iln`: the same as the `iln` command."""

from iln.cli.main import main

raise SystemExit(main())
