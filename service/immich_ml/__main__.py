"""`python -m immich_ml` runs the command-line interface."""

from immich_ml.cli import main

raise SystemExit(main())
