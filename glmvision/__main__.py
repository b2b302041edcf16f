"""`python -m glmvision`: the same as the `glmvision` command."""

import sys

from .cli import main

sys.exit(main())
