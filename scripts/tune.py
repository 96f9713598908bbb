"""Tune EMA momentum and consistency weight with Optuna (same as `medeman tune`); see `--help`."""

from medeman.tune import main

if __name__ == "__main__":
    raise SystemExit(main())
