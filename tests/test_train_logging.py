"""Lightning's litlogger advert is hidden by the commands that train, never by importing medeman."""

from __future__ import annotations

import logging
import subprocess
import sys

ADVERT_LOGGER = "lightning.pytorch.utilities.rank_zero"


def test_importing_medeman_train_changes_no_logger():
    code = (
        "import logging, medeman.train, medeman.tune, medeman.demo; "
        f"print(len(logging.getLogger({ADVERT_LOGGER!r}).filters))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0"


def test_hide_lightning_advert_drops_the_advert_only_and_is_installed_once():
    from medeman.train import _hide_advert, hide_lightning_advert

    logger = logging.getLogger(ADVERT_LOGGER)
    try:
        hide_lightning_advert()
        hide_lightning_advert()
        assert logger.filters.count(_hide_advert) == 1

        def record(message: str) -> logging.LogRecord:
            return logging.LogRecord(ADVERT_LOGGER, logging.INFO, __file__, 1, message, None, None)

        assert not logger.filter(record("Tip: for seamless cloud logging, try installing [litlogger]"))
        assert logger.filter(record("GPU available: False, used: False"))
    finally:
        logger.removeFilter(_hide_advert)
