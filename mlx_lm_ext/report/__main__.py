"""python -m mlx_lm_ext.report: see cli.py."""

import sys

from .cli import main

sys.exit(main())
