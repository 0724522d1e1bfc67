import sys

from deepserve.cli.main import main

sys.exit(main())
