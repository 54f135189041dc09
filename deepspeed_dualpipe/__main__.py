import sys

from deepspeed_dualpipe.cli import main

sys.exit(main())
