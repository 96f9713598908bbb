"""Export a trained medeman teacher as a MONAI bundle, ONNX or TorchScript model (same as `medeman export`)."""

from medeman.export import main

raise SystemExit(main())
