"""``python -m graphteleport`` runs the CLI."""

from graphteleport.cli import main

raise SystemExit(main())
