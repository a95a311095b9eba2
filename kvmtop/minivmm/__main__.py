"""``python -m kvmtop.minivmm``: the built-in VMM's command line (:func:`kvmtop.minivmm.vmm.main`)."""

import sys

from kvmtop.minivmm.vmm import main

sys.exit(main())
