"""`python -m benchmarks [--quick] [--level head step fit] ...`: see benchmarks/suite.py."""
import sys

from benchmarks.suite import main

if __name__ == "__main__":
    sys.exit(main())
