"""Check a cohort and print a table of its cases and problems (see medeman/check_data.py)."""

from medeman.check_data import main

raise SystemExit(main())
