"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
    """A mistake the user can fix: the message is one line naming the problem and the fix.

    The CLI prints it without a traceback and exits with status 2.
    """


class NotFinetuned(UserError):
    """`merge` or `eval` found no finished fine-tuning run for its config.

    The Hydra glue completes the message with the `clmerge finetune` command (and overrides) to run.
    """

    def __init__(self, store_path: str):
        super().__init__(f"nothing is fine-tuned for this config (no finished run at {store_path}); "
                         "run `clmerge finetune` with the same overrides first")
        self.store_path = store_path
