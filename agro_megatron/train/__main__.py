import sys

from agro_megatron.cli.train import main

sys.exit(main())
