import sys

from cellsam.cli import main

sys.exit(main())
