"""Semi-supervised methods as plug-ins (one file per method) and their building blocks."""
