"""python -m polarprune: the same as the `polarprune` command."""
import sys

from polarprune.cli import main

sys.exit(main())
