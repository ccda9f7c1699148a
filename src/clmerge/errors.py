"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
    """A mistake the user can fix: the message is one line naming the problem and the fix.

    The CLI prints it without a traceback and exits with `exit_code` (2).
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class NotFinetuned(UserError):
    """`merge` or `eval` found no finished fine-tuning run for its config.

    The Hydra glue completes the message with the `clmerge finetune` command (and overrides) to run.
    """

    def __init__(self, store_path: str):
        super().__init__(f"nothing is fine-tuned for this config (no finished run at {store_path}); "
                         "run `clmerge finetune` with the same overrides first")
        self.store_path = store_path


PREEMPTED_EXIT = 143  # 128 + SIGTERM: the status of a job ended by SIGTERM, so no script takes it for a success


class Preempted(UserError):
    """SIGTERM (a cluster's preemption) stopped fine-tuning after saving a step checkpoint; rerun to resume."""

    def __init__(self, message: str):
        super().__init__(message, PREEMPTED_EXIT)
