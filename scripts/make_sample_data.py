"""Write the synthetic sample cohort (see medeman/sample_data.py)."""

from medeman.sample_data import main

raise SystemExit(main())
