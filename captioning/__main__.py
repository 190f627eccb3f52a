"""``python -m captioning --data DIR ...`` (the same as ``python -m trainer caption``)."""

import sys

from captioning.cli import main

sys.exit(main())
