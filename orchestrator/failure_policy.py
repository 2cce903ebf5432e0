"""Ray Train's failure policy, told about deterministic worker failures (trainer/failures.py).

Ray Train V2 hands every worker-group failure to a ``FailurePolicy`` that answers RETRY or
RAISE; its default retries any worker error up to ``FailureConfig.max_failures``. This one
answers RAISE at once when any rank raised a ``DeterministicFailure`` (an allocation that
does not fit, a full disk, a config error) and defers to the default for the rest, so a
killed worker or a lost node still restarts. The policy object is built in the driver and
travels to Ray Train's controller actor; ``TorchTrainer`` has no public argument for it, so
``launch`` passes it where ``fit()`` starts the controller.

Ray 2.60's public API has no other way: ``FailureConfig`` only counts failures (its
``fail_fast`` is deprecated), no exception type is treated as final, and a worker that
returned instead of raising would leave its peers waiting in a collective.
"""

from __future__ import annotations

import logging

from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2.api.exceptions import TrainingFailedError

from trainer import failures

log = logging.getLogger(__name__)


class FailFastPolicy(DefaultFailurePolicy):
    def make_decision(self, training_failed_error: TrainingFailedError) -> FailureDecision:
        found = failures.find(training_failed_error)
        if found is not None:
            log.info("deterministic worker failure, not retried: %s", found)
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)
