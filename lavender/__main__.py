import sys

from lavender.cli import main

sys.exit(main())
