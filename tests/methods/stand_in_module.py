"""What a method's loss asks of the LightningModule, with a fixed teacher: shared by the FixMatch and paste tests."""

from __future__ import annotations


class FixedTeacherModule:
    """Stands in for the module: a fixed teacher softmax, no logging steps."""

    def __init__(self, probs):
        self.probs = probs

    def teacher_probs(self, weak):
        return self.probs

    def writes_training_logs(self):
        return False
