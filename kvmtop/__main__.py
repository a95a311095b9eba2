import sys

from kvmtop.cli import main

sys.exit(main())
