import sys

from lingua_mem.checkpoint.consolidate import main

sys.exit(main(sys.argv[1:]))
