import sys

from knowcat.cli import main

sys.exit(main())
