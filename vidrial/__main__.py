import sys

from vidrial.cli import main

sys.exit(main())
