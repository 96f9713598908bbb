"""Segment scans with a trained medeman teacher (same as `medeman infer`)."""

from medeman.infer import main

raise SystemExit(main())
