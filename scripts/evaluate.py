"""Score predictions against labels: Dice, HD95, ASD in mm (same as `medeman evaluate`)."""

from medeman.evaluate import main

raise SystemExit(main())
