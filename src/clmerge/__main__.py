"""`python -m clmerge ...` (and `torchrun ... -m clmerge finetune ...`): the `clmerge` command."""

from clmerge.cli import app

if __name__ == "__main__":
    app(prog_name="clmerge")
