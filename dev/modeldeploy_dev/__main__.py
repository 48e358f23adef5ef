import sys

from modeldeploy_dev import cli

sys.exit(cli.main())
