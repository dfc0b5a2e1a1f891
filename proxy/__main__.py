"""`python -m proxy ...` runs the same command line as `idempotency-proxy ...`."""

from proxy.cli import main

raise SystemExit(main())
