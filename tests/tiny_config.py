"""The ``--set`` overrides of the tiny network and data the training tests share (seconds on a CPU)."""

TINY_BASE = [
    "model.channels=[4,8]",
    "model.num_res_units=1",
    "data.patch_size=[16,16,16]",
    "data.spacing=[1,1,1]",
    "data.num_classes=3",
    "data.num_workers=0",
    "data.cache=none",
    "data.val_fraction=0.34",
    "train.log_every_steps=1",
]
# the mean-teacher tests: validation every 2 steps, the ramp-up over 2 steps, no warm-up
TINY = [*TINY_BASE, "train.val_every_steps=2", "ssl.rampup_steps=2", "ssl.warmup_steps=0"]
