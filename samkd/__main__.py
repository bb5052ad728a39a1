"""`python -m samkd` runs the `samkd` command (also under torchrun)."""

from samkd.cli import app

if __name__ == "__main__":
    app()
