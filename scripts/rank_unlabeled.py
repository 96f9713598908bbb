"""Rank unlabeled scans for annotation by the teacher's doubt (same as `medeman rank`)."""

from medeman.rank import main

raise SystemExit(main())
