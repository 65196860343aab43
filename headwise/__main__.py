"""`python -m headwise`: the same as the `headwise` command."""
import sys

from headwise.train.cli import main

sys.exit(main())
