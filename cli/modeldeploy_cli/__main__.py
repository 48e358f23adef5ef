import sys

from modeldeploy_cli import main

sys.exit(main.main())
