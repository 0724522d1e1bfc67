import sys

try:
    from deepserve.cli.main import main
except KeyboardInterrupt:   # Ctrl-C while the package imports
    sys.exit(130)

sys.exit(main())
