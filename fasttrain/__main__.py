"""``python -m fasttrain <command>``: the same as the ``fasttrain`` console command."""
import sys

from fasttrain.cli import main

sys.exit(main())
