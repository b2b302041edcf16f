"""`python -m glmvision`: the same as the `glmvision` command."""

import sys

from glmvision.cli.main import main

sys.exit(main())
