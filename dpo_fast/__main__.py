"""`python -m dpo_fast ...` is the `dpo-fast` command."""
import sys

from dpo_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
