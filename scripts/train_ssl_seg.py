"""Train a semi-supervised 3D segmentation model (same as `medeman train`); see `--help`."""

from medeman.train import main

if __name__ == "__main__":
    raise SystemExit(main())
