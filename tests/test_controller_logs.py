"""The Train controller's transient coordinator warning stays off the driver; its other lines do not."""
from __future__ import annotations

import importlib
import logging

import pytest

from student_workers.train.abort import COORDINATOR_LOGGER, COORDINATOR_TIMEOUT, quiet_controller_logs

pytestmark = pytest.mark.unit


def test_the_filter_sits_on_the_logger_ray_train_uses():
    module = importlib.import_module(COORDINATOR_LOGGER)  # moved by a Ray upgrade: this fails first
    assert module.logger.name == COORDINATOR_LOGGER
    assert COORDINATOR_TIMEOUT in importlib.util.find_spec(COORDINATOR_LOGGER).loader.get_source(COORDINATOR_LOGGER)


def test_the_coordinator_timeout_is_dropped_and_other_warnings_pass(caplog):
    logger = logging.getLogger(COORDINATOR_LOGGER)
    before = list(logger.filters)
    try:
        quiet_controller_logs()
        quiet_controller_logs()  # a second controller start in one process adds nothing
        assert len(logger.filters) == len(before) + 1
        with caplog.at_level(logging.WARNING, logger=COORDINATOR_LOGGER):
            try:
                raise TimeoutError("GetTimeoutError")
            except TimeoutError:
                logger.warning(f"{COORDINATOR_TIMEOUT} for train-run-1. If this only happens transiently ...",
                               exc_info=True)
            logger.warning("the coordinator is gone")
        assert [r.getMessage() for r in caplog.records] == ["the coordinator is gone"]
    finally:
        logger.filters[:] = before


def test_the_filter_is_in_place_once_the_callback_reaches_the_controller():
    """Ray's scaling policy sends its first request from its own after_controller_start, which runs
    before the job's: the filter goes in when the callback is unpickled in the controller."""
    import pickle

    import ray.cloudpickle

    from student_workers.train.abort import controller_callback

    logger = logging.getLogger(COORDINATOR_LOGGER)
    before = list(logger.filters)
    try:
        blob = ray.cloudpickle.dumps(controller_callback("signal"))
        assert len(logger.filters) == len(before)  # the driver's loggers are left alone
        callback = pickle.loads(blob)
        assert callback.signal == "signal"
        assert len(logger.filters) == len(before) + 1
    finally:
        logger.filters[:] = before
