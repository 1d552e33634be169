"""`python -m fp8norm ...` (also how torchrun starts it)."""

from .cli import run

run()
